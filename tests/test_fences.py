"""Private APIs of vLLM, Ray, transformers and uvicorn are used in one fence module per library, and nowhere else.

The source tree is read as Python syntax (no import): any import of an
underscore module or name of those libraries or of a module they do not
document, an underscore attribute or keyword of theirs, an override of a
library class's underscore method, or a ``__class__`` swap outside the fences
fails the test with its file and line. Whose an underscore name is, is told by
where it is defined, not by its spelling: a name any of the libraries defines
(read from their installed sources) is theirs, even where the project defines
one spelt the same, unless it is read on ``self`` of a class of the project's
own or on an object imported from the project's modules. Each fence refuses,
in one line, a release other than the one it was written for.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCES = {
    "vllm": "serve/engine/vllm_private.py",
    "transformers": "serve/engine/transformers_private.py",
    "ray": "serve/runtime/ray_private.py",
    "uvicorn": "serve/service/uvicorn_private.py",
}
LIBRARIES = set(FENCES)
#: The project's own packages: a name imported from them is the project's.
PROJECT = {"serve", "adapters", "loadtest", "tests", "scripts", "k8s"}
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
#: uvicorn documents its Config, Server, run and the forwarded-headers middleware; its protocols are internal.
UVICORN_PUBLIC = ("uvicorn", "uvicorn.middleware.proxy_headers")
#: Libraries that document only some of their modules: every other module of theirs is internal.
DOCUMENTED_MODULES = {"vllm": VLLM_PUBLIC, "uvicorn": UVICORN_PUBLIC}
#: Attributes vLLM documents nowhere (the engine core behind ``LLM``).
UNDOCUMENTED = {"engine_core"}
#: Underscore names of other packages, known and pinned, by the file that reads them and why.
ELSEWHERE = {
    ("serve/grading/vad.py", "_model"): "Silero VAD's TorchScript model holds its parts there (silero-vad is pinned)",
}
#: Underscore names the standard library documents (namedtuple's methods, argparse's subparsers type, os._exit).
STDLIB_PUBLIC = {"_replace", "_asdict", "_fields", "_make", "_SubParsersAction", "_exit"}


def sources() -> list[Path]:
    return [p for top in sorted(PROJECT) for p in sorted((ROOT / top).rglob("*.py")) if "schemas" not in p.parts]


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


#: Where a module, class or function defines an underscore name: ``def _x``, ``class _x``, ``self._x =``, ``_x =``.
DEFINITION = re.compile(rb"(?:\bdef |\bclass |\bself\.|\bcls\.|^[ \t]*)(_[A-Za-z0-9]\w*)\s*(?:[(:=]|$)", re.M)


@functools.cache
def library_names_defined() -> frozenset[str]:
    """Underscore names the libraries define, read from their installed sources (a few seconds, once)."""
    names: set[str] = set()
    for library in sorted(LIBRARIES):
        root = Path(importlib.util.find_spec(library).origin).parent
        for path in root.rglob("*.py"):
            names.update(m.decode() for m in DEFINITION.findall(path.read_bytes()))
    return frozenset(names - {"__init__"})


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


def imported_names(tree: ast.AST, packages: set[str]) -> set[str]:
    """Names a module binds to something imported from ``packages`` (top-level package names)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in packages:
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in packages}
    return names


def library_names(tree: ast.AST) -> set[str]:
    """Names a module binds to something imported from the fenced libraries."""
    return imported_names(tree, LIBRARIES)


def internal_module(module: str) -> bool:
    """Whether ``module`` is one its library does not document (for libraries that document only some)."""
    public = DOCUMENTED_MODULES.get(module.split(".")[0])
    if public is None:
        return False
    top = module.split(".")[0]
    return not any(module == p or p != top and module.startswith(p + ".") for p in public)


def makes_local(call: ast.Call, local: set[str]) -> bool:
    """Whether ``call`` makes one of the project's objects: a project function or class called, or ``__new__`` of
    a project class."""
    if root_name(call.func) in local:
        return True
    new = isinstance(call.func, ast.Attribute) and call.func.attr == "__new__"
    return new and bool(call.args) and root_name(call.args[0]) in local


def root_name(node: ast.AST) -> str | None:
    """The name an attribute chain starts from (``a`` of ``a.b.c``), if it starts from a name."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def private_uses(tree: ast.AST, own: set[str], theirs: frozenset[str] = frozenset()) -> list[str]:
    """``line: what`` for each private use of the libraries in ``tree``.

    ``own``: underscore names the project defines; ``theirs``: those the libraries define. A name is the
    library's where the libraries define it or the project does not, unless it is read on ``self``/``cls`` of a
    project class that derives from no library class, or on a name imported from the project or defined in
    ``tree``.
    """
    found = []
    imported = library_names(tree)
    local = imported_names(tree, PROJECT) | {
        n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }
    # and the names bound to what the project's own functions and classes return (``object.__new__(Ours)`` too)
    local |= {
        t.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call) and makes_local(n.value, local)
        for t in n.targets
        if isinstance(t, ast.Name)
    }

    def add(node: ast.AST, what: str) -> None:
        found.append(f"{node.lineno}: {what}")

    def derives_from_library(cls: ast.ClassDef) -> bool:
        return bool({ast.unparse(b).split(".")[0] for b in cls.bases} & imported)

    def theirs_on(receiver: ast.AST, name: str, cls: ast.ClassDef | None) -> bool:
        """Whether ``receiver.name`` reads the library's underscore name."""
        if not private(name) or name in STDLIB_PUBLIC:
            return False
        if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls") and cls is not None:
            return derives_from_library(cls) and name in theirs
        if root_name(receiver) in local:
            return False
        return name in theirs or name not in own

    def visit(node: ast.AST, cls: ast.ClassDef | None) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] not in LIBRARIES:
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
                if any(private(p) for p in module.split(".")) or any(private(n) for n in names):
                    add(node, f"private import from {module}")
                else:
                    submodules = [f"{module}.{n}" for n in names if is_module(module, n)]
                    for internal in [m for m in (module, *submodules) if internal_module(m)][:1]:
                        add(node, f"import of {module.split('.')[0]}'s internal module {internal}")
        elif isinstance(node, ast.Attribute):
            if node.attr == "__class__" and isinstance(node.ctx, ast.Store):
                add(node, "__class__ swap")
            elif node.attr in UNDOCUMENTED:
                add(node, f"undocumented attribute .{node.attr}")
            elif theirs_on(node.value, node.attr, cls):
                add(node, f"private attribute {ast.unparse(node)}")
        elif isinstance(node, ast.Call):
            called_locally = root_name(node.func) in local
            for kw in node.keywords:
                if kw.arg and private(kw.arg) and not called_locally and (kw.arg in theirs or kw.arg not in own):
                    add(node, f"private keyword {kw.arg}=")
            if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "hasattr", "delattr"):
                target = node.args[0] if node.args else None
                arg = node.args[1] if len(node.args) > 1 else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    if arg.value in UNDOCUMENTED | {"__class__"} or theirs_on(target, arg.value, cls):
                        add(node, f"{node.func.id}(..., {arg.value!r})")
        elif isinstance(node, ast.ClassDef):
            if derives_from_library(node):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and private(item.name):
                        if item.name in theirs or item.name not in own:
                            add(item, f"override of {node.name}.{item.name} (a library's private method)")
            cls = node
        for child in ast.iter_child_nodes(node):
            visit(child, cls)

    visit(tree, None)
    return found


def is_module(package: str, name: str) -> bool:
    """Whether ``package.name`` is a module (``from uvicorn import config``), found on disk without importing."""
    top, *rest = package.split(".")
    folder = Path(importlib.util.find_spec(top).origin).parent.joinpath(*rest)
    return (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file()


@functools.cache
def project_trees() -> dict[Path, ast.AST]:
    """Every project source outside the fences, parsed once per test run."""
    fences = {ROOT / f for f in FENCES.values()}
    return {p: ast.parse(p.read_text(), str(p)) for p in sources() if p not in fences}


@functools.cache
def project_own_names() -> frozenset[str]:
    return frozenset(own_names(list(project_trees().values())))


def scan() -> dict[str, list[str]]:
    trees = project_trees()
    own = project_own_names()
    theirs = library_names_defined()
    return {
        path: uses
        for p, t in trees.items()
        if (path := str(p.relative_to(ROOT)))
        and (uses := [u for u in private_uses(t, own, theirs) if (path, u.rsplit(".", 1)[-1]) not in ELSEWHERE])
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
    "from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol": "uvicorn's internal module",
    "from uvicorn import config\nconfig.HTTP_PROTOCOLS['auto'] = 'x:Y'": "uvicorn's internal module uvicorn.config",
    # spelt like names the project defines (``_config``, ``_lock``), but read on a library's objects
    "import uvicorn\ncfg = server._config": "private attribute server._config",
    "from ray import serve\nlock = serve.context._lock": "private attribute serve.context._lock",
    "x = getattr(tower, '_get_feat_extract_output_lengths')": "getattr",
    "from transformers import WhisperFeatureExtractor\n"
    "class F(WhisperFeatureExtractor):\n"
    "    def _torch_extract_fbank_features(self, w):\n"
    "        return w": "override of F._torch_extract_fbank_features",
}


@pytest.mark.parametrize("code", list(PLANTED))
def test_a_planted_private_use_is_found(code):
    own = set(project_own_names()) - {"_torch_extract_fbank_features", "_process_audio_input"}
    found = private_uses(ast.parse(code), own, library_names_defined())
    assert any(PLANTED[code] in f for f in found), found


def test_a_name_spelt_like_a_library_s_is_the_project_s_only_on_the_project_s_objects():
    """``_config`` is defined by the project and by the libraries: on ``self`` of a project class or on a module
    of the project it is the project's; on a library's object, or overridden in a class deriving from a library
    class, it is the library's."""
    theirs = library_names_defined()
    assert {"_config", "_lock"} <= theirs
    own = {"_config", "_lock"}
    ours = (
        "from serve.service import settings\n"
        "class Ours:\n"
        "    def f(self):\n"
        "        return self._config, settings._lock\n"
        "def made():\n"
        "    return Ours()\n"
        "ours = made()\n"
        "ours._config = None\n"
    )
    assert private_uses(ast.parse(ours), own, theirs) == []
    theirs_code = "from uvicorn import Server\nclass Ours(Server):\n    def f(self):\n        return self._config\n"
    assert [u.split(": ", 1)[1] for u in private_uses(ast.parse(theirs_code), own, theirs)] == [
        "private attribute self._config"
    ]


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
        ("uvicorn", "serve.service.uvicorn_private", "0.56.0"),
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
