"""The layout holds: layers and forbidden imports (import-linter contracts in pyproject.toml), no import cycles.

Imports inside functions count: grimp reads every import statement of a module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("serve", "adapters", "loadtest")
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def import_cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in imports.get(m, ()):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1 or m in imports.get(m, ()):
                cycles.append(sorted(component))

    for m in sorted(imports):
        if m not in index:
            visit(m)
    return cycles


def test_cycle_finder_finds_cycles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_modules():
    graph = grimp.build_graph(*PACKAGES)
    imports = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert sum(len(v) for v in imports.values()) > 100  # the graph really holds the project's imports
    assert import_cycles(imports) == []


def test_import_contracts_hold():
    r = subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


PLANTED = {
    "an engine importing Ray": (
        "serve/engine/requests.py",
        "from ray import serve",
        ["the engine package (loaded by vLLM's processes) imports no Ray BROKEN", "serve.engine.requests -> ray"],
    ),
    "the session importing the service": (
        "serve/session/run.py",
        "from serve.service import options",
        ["session and service are siblings BROKEN", "serve.session.run -> serve.service.options"],
    ),
}


@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_a_planted_forbidden_import_breaks_the_contracts(tmp_path, planted):
    module, statement, expected = PLANTED[planted]
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {statement}  # noqa: F401\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    out = " ".join(r.stdout.split())  # lint-imports wraps long contract names
    for line in expected:
        assert line in out, r.stdout[-3000:]


def test_serve_has_subpackages_and_no_loose_modules():
    loose = sorted(p.name for p in (REPO / "serve").glob("*.py") if p.name != "__init__.py")
    assert loose == []
    assert {p.name for p in (REPO / "serve").iterdir() if (p / "__init__.py").is_file()} >= {
        "grading",
        "engine",
        "service",
        "cli",
        "session",
        "runtime",
    }


@pytest.mark.slow  # a process that imports vLLM: ~20 s on 2 cores
def test_the_vllm_model_module_loads_without_ray_serve():
    code = (
        "import sys, serve.engine.plugin as p, importlib; "
        "importlib.import_module(p.MODEL_CLASS.split(':')[0]); "
        "print(sorted(m for m in sys.modules if m == 'ray.serve' or m.startswith('ray.serve.')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
