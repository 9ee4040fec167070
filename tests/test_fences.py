"""Private APIs of vLLM, Ray and transformers are used in one fence module per library, and nowhere else.

The source tree is read as Python syntax (no import): any import of an
underscore module or name of those libraries, an undocumented vLLM module, an
underscore attribute or keyword that is not the project's own, an override of a
library class's underscore method, or a ``__class__`` swap outside the fences
fails the test with its file and line. Each fence refuses, in one line, a
release other than the one it was written for.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCES = {
    "vllm": "serve/engine/vllm_private.py",
    "transformers": "serve/engine/transformers_private.py",
    "ray": "serve/runtime/ray_private.py",
}
LIBRARIES = set(FENCES)
#: vLLM names no module private with an underscore: these are the documented ones (entry points, plugin and
#: model-registration interfaces); every other vLLM module is internal.
VLLM_PUBLIC = (
    "vllm",
    "vllm.lora.request",
    "vllm.platforms",
    "vllm.multimodal",
    "vllm.model_executor.models",
    "vllm.v1.engine.async_llm",
    "vllm.sampling_params",
)
#: Attributes vLLM documents nowhere (the engine core behind ``LLM``).
UNDOCUMENTED = {"engine_core"}
#: Underscore names the standard library documents (namedtuple's methods, argparse's subparsers type, os._exit).
STDLIB_PUBLIC = {"_replace", "_asdict", "_fields", "_make", "_SubParsersAction", "_exit"}


def sources() -> list[Path]:
    return [
        p
        for top in ("serve", "adapters", "loadtest", "tests", "scripts", "k8s")
        for p in sorted((ROOT / top).rglob("*.py"))
        if "schemas" not in p.parts
    ]


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def own_names(trees: list[ast.AST]) -> set[str]:
    """Underscore names the project defines itself (functions, classes, attributes it assigns)."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and private(node.name):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and private(node.id):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and private(node.attr):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):  # not another's object
                    names.add(node.attr)
            elif isinstance(node, ast.arg) and private(node.arg):
                names.add(node.arg)
    return names


def library_names(tree: ast.AST) -> set[str]:
    """Names a module binds to something imported from vLLM, Ray or transformers."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in LIBRARIES}
    return names


def private_uses(tree: ast.AST, own: set[str]) -> list[str]:
    """``line: what`` for each private use of the libraries in ``tree``."""
    found = []
    imported = library_names(tree)

    def add(node: ast.AST, what: str) -> None:
        found.append(f"{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] not in LIBRARIES:
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
                if any(private(p) for p in module.split(".")) or any(private(n) for n in names):
                    add(node, f"private import from {module}")
                elif module.split(".")[0] == "vllm" and not any(
                    module == p or p != "vllm" and module.startswith(p + ".") for p in VLLM_PUBLIC
                ):
                    add(node, f"import of vLLM's internal module {module}")
        elif isinstance(node, ast.Attribute):
            if node.attr == "__class__" and isinstance(node.ctx, ast.Store):
                add(node, "__class__ swap")
            elif node.attr in UNDOCUMENTED:
                add(node, f"undocumented attribute .{node.attr}")
            elif private(node.attr) and node.attr not in own | STDLIB_PUBLIC:
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    add(node, f"private attribute {ast.unparse(node)}")
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg and private(kw.arg) and kw.arg not in own:
                    add(node, f"private keyword {kw.arg}=")
            if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "hasattr", "delattr"):
                arg = node.args[1] if len(node.args) > 1 else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    if private(arg.value) and arg.value not in own or arg.value in UNDOCUMENTED | {"__class__"}:
                        add(node, f"{node.func.id}(..., {arg.value!r})")
        elif isinstance(node, ast.ClassDef):
            bases = {b.id if isinstance(b, ast.Name) else ast.unparse(b).split(".")[0] for b in node.bases}
            if bases & imported:
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and private(item.name):
                        add(item, f"override of {node.name}.{item.name} (a library's private method)")
    return found


def scan() -> dict[str, list[str]]:
    fences = {ROOT / f for f in FENCES.values()}
    trees = {p: ast.parse(p.read_text(), str(p)) for p in sources()}
    # Names defined in classes that subclass a library's (overrides of its hooks) are not the project's own.
    own = own_names([t for p, t in trees.items() if p not in fences])
    for tree in trees.values():
        imported = library_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and {ast.unparse(b).split(".")[0] for b in node.bases} & imported:
                own -= {i.name for i in node.body if isinstance(i, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return {
        str(p.relative_to(ROOT)): uses for p, t in trees.items() if p not in fences and (uses := private_uses(t, own))
    }


def test_no_private_use_of_the_engines_outside_their_fences():
    found = scan()
    assert not found, "private APIs used outside serve/*/*_private.py:\n" + "\n".join(
        f"  {path}:{use}" for path, uses in found.items() for use in uses
    )


PLANTED = {
    "import ray._private.worker": "private import from ray._private.worker",
    "from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter": "private import",
    "from ray.serve.context import _get_serve_request_context": "private import",
    "from vllm.distributed.utils import sched_yield": "internal module vllm.distributed.utils",
    "node = ray._private.worker._global_node": "private attribute",
    "core = llm.llm_engine.engine_core": "undocumented attribute .engine_core",
    "request._body = b''": "private attribute request._body",
    "fe.__class__ = Other": "__class__ swap",
    "ray.init(_system_config={})": "private keyword _system_config=",
    "x = getattr(tower, '_get_feat_extract_output_lengths')": "getattr",
    "from transformers import WhisperFeatureExtractor\n"
    "class F(WhisperFeatureExtractor):\n"
    "    def _torch_extract_fbank_features(self, w):\n"
    "        return w": "override of F._torch_extract_fbank_features",
}


@pytest.mark.parametrize("code", list(PLANTED))
def test_a_planted_private_use_is_found(code):
    own = own_names([ast.parse(p.read_text()) for p in sources() if str(p.relative_to(ROOT)) not in FENCES.values()])
    own -= {"_torch_extract_fbank_features", "_process_audio_input"}
    found = private_uses(ast.parse(code), own)
    assert any(PLANTED[code] in f for f in found), found


def test_the_project_own_underscore_names_and_public_apis_pass():
    ok = (
        "from ray.serve.request_router import RequestRouter, MultiplexMixin\n"
        "from vllm import LLM, SamplingParams\n"
        "class R(MultiplexMixin, RequestRouter):\n"
        "    def choose(self):\n"
        "        return self._own\n"
        "p = point._replace(x=1)\n"
    )
    assert private_uses(ast.parse(ok), set()) == []


@pytest.mark.parametrize(
    "library,fence,version",
    [
        ("vllm", "serve.engine.vllm_private", "0.33.0"),
        ("ray", "serve.runtime.ray_private", "2.61.0"),
        ("transformers", "serve.engine.transformers_private", "5.20.0"),
    ],
)
def test_a_fence_refuses_another_release_in_one_line(library, fence, version):
    code = f"import {library}; {library}.__version__ = {version!r}; import {fence}"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"ImportError: {fence} was written for {library} ")
        and f"{library} {version} is installed" in last
    )


def test_the_words_of_ray_texts_match_the_errors_ray_makes():
    """The proxy answers a shed request with BackPressureError's message and a dead replica with the error's name."""
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from serve.runtime.ray_private import is_backpressure_text, is_replica_gone_text

    assert is_backpressure_text(BackPressureError(num_queued_requests=5, max_queued_requests=5).message)
    gone = DeploymentUnavailableError("Deployment(name='Scorer', app='l2grader')")
    assert is_replica_gone_text(f"{type(gone).__name__}: {gone.message}")
    assert is_replica_gone_text(f"{ActorDiedError.__name__}: {ActorDiedError()}")
    assert not is_backpressure_text("Internal Server Error") and not is_replica_gone_text("Traceback: KeyError")
