"""Session fixtures: the generated tiny checkpoint, test audio, the one real service; the ``l2grader`` runner.

The tiers (``slow`` marks) and a check that no test leaves process-wide state changed are here too.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtest.service import Service, l2grader_cmd
from tests.audio_fixtures import write

#: ``l2grader`` of this interpreter: the one command line every test runs it by.
L2GRADER = l2grader_cmd()
USER_KEY, ADMIN_KEY = "user-key-123", "admin-key-456"
KEYS_ENV = {"L2G_TEST_API_KEYS": USER_KEY, "L2G_TEST_ADMIN_KEYS": ADMIN_KEY}
SERVICE_BODY_TIMEOUT_S = 5
USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def require_espeak() -> None:
    """Skip (fail on CI) where espeak-ng, which makes the synthetic speech, is missing."""
    if shutil.which("espeak-ng") is None:
        msg = "espeak-ng is not installed (scripts/install.sh installs it as root; apt-get install espeak-ng)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


#: The espeak-ng sentences of :func:`espeak_sentences`: three voices at two rates, two texts whose last two words
#: end in a consonant that fades (the voices that stop a final vowel at full loudness: docs/trust.md, cut-off answers).
ESPEAK_VOICES, ESPEAK_RATES = ("en-us", "en-gb-scotland", "en+f3"), (120, 200)
ESPEAK_TEXTS = ("My favourite food is rice with vegetables", "At the weekend I play football with friends")


@pytest.fixture(scope="session")
def espeak_speech() -> list:
    """Two espeak-ng answers of 6-10 s (sentences with pauses, silence around, speech at -20 dBFS; 16 kHz float32),
    made once per session: speech that a speech detector must hear as speech."""
    require_espeak()
    from loadtest import vad_bench

    return [vad_bench._speech(i) for i in range(2)]


@pytest.fixture(scope="session")
def espeak_sentences() -> list:
    """Twelve espeak-ng sentences of 2-4 s (:data:`ESPEAK_VOICES` x :data:`ESPEAK_RATES` x :data:`ESPEAK_TEXTS`), a
    pause before each of their last two words, each with where those words lie
    (:class:`loadtest.cutoff_bench.Answer`), made once per session (~1 s)."""
    require_espeak()
    from loadtest import cutoff_bench

    return cutoff_bench.answers(ESPEAK_VOICES, ESPEAK_RATES, ESPEAK_TEXTS)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny checkpoint with its demo adapters and demo.yaml, made once per session."""
    from adapters.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_config(tiny_dir):
    """Factory of the tiny checkpoint's demo config as a fresh dict, with absolute paths (write it anywhere)."""
    import yaml

    def make() -> dict:
        raw = yaml.safe_load((tiny_dir / "demo.yaml").read_text())
        raw["model"]["base"] = str(tiny_dir / "model")
        for pcfg in raw["parts"].values():
            for holder in (pcfg, *pcfg.get("aspects", {}).values()):
                if holder.get("adapter"):
                    holder["adapter"] = str(tiny_dir / holder["adapter"])
        return raw

    return make


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory) -> Path:
    """Answers in four formats and several lengths, plus bad inputs."""
    d = tmp_path_factory.mktemp("audio")
    write(d / "a.wav", 20, 16000, seed=1)
    write(d / "b.flac", 75, 44100, seed=2)
    write(d / "c.ogg", 8, 48000, seed=3)
    write(d / "d.mp3", 12, 22050, seed=4)
    import numpy as np
    import soundfile as sf

    sf.write(d / "silent.wav", np.zeros(16000 * 5, dtype=np.float32), 16000)
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 8)
    (d / "empty.wav").write_bytes(b"")
    return d


def l2grader(
    *args, timeout: float = 600, env: dict[str, str] | None = None, input: str | None = None, wait: bool = True
) -> subprocess.CompletedProcess | subprocess.Popen:
    """``l2grader ARGS`` run as a user runs it: its own process, text output captured, bounded in time.

    ``wait=False`` returns the running process instead (its output on pipes, in a process group of its own that
    the test may signal), for a test that stops it.
    """
    cmd = [*L2GRADER, *map(str, args)]
    if not wait:
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
    return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def what_it_said(r: subprocess.CompletedProcess, chars: int = 3000) -> str:
    """A command's stderr, stdout and the end of the library log it names: what a failed assertion shows."""
    said = f"exit {r.returncode}\n--- stderr\n{r.stderr[-chars:]}\n--- stdout\n{r.stdout[-chars:]}"
    named = re.search(r"library output: (\S+) \(", r.stderr)
    if named and Path(named.group(1)).is_file():
        said += f"\n--- {named.group(1)}\n{Path(named.group(1)).read_text(errors='replace')[-chars:]}"
    return said


@dataclass(frozen=True)
class RealService:
    """The one real service of a test run: its URL, config file, log and the folder admin calls may take from."""

    url: str
    config: Path
    log: Path
    adapter_root: Path
    pid: int  # the `l2grader serve` process, root of the service's process tree


#: Services stopped once the last test that uses them has run (see pytest_runtest_teardown).
_RUNNING: list[Service] = []
LAST_USER = pytest.StashKey[str]()


@contextmanager
def keyed_service(raw: dict, d: Path) -> Iterator[Service]:
    """``l2grader serve`` of the config ``raw`` (written into ``d`` with the test API keys and a registry file), for
    a module whose config the shared service cannot have; it stops when the block ends."""
    import yaml

    raw["serving"] = {
        **raw.get("serving", {}),
        "api_keys_env": "L2G_TEST_API_KEYS",
        "admin_keys_env": "L2G_TEST_ADMIN_KEYS",
        "registry_file": str(d / "registry.json"),
    }
    (d / "service.yaml").write_text(yaml.safe_dump(raw))
    service = Service(str(d / "service.yaml"), d / "serve.log", env=KEYS_ENV, ready_timeout_s=600)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def real_service(tiny_config, tiny_dir, tmp_path_factory) -> Iterator[RealService]:
    """``l2grader serve`` (Ray Serve, vLLM on the tiny checkpoint) on loopback, shared by every module that needs one.

    One config serves them all: the test API keys, a registry file, two adapter
    slots for the demo's two parts (a third part evicts one, as in production
    with many parts), a 5 s body deadline, uploads up to 24 MB / 660 s, and a
    folder beside the demo adapters from which admin calls may register parts.
    It stops after the last test that uses it (modules run in file order).
    """
    import yaml

    d = tmp_path_factory.mktemp("real-service")
    adapter_root = d / "uploaded_adapters"
    adapter_root.mkdir()
    raw = tiny_config()
    raw["audio"] = {"max_upload_mb": 24, "max_duration_s": 660}
    raw["serving"] = {
        "api_keys_env": "L2G_TEST_API_KEYS",
        "admin_keys_env": "L2G_TEST_ADMIN_KEYS",
        "registry_file": str(d / "registry.json"),
        "body_timeout_s": SERVICE_BODY_TIMEOUT_S,
        "adapters_per_replica": 2,
        "adapter_roots": [str(tiny_dir / "adapters"), str(adapter_root)],
    }
    config = d / "service.yaml"
    config.write_text(yaml.safe_dump(raw))
    service = Service(str(config), d / "serve.log", env=KEYS_ENV, ready_timeout_s=600)
    _RUNNING.append(service)
    try:
        yield RealService(service.url, config, service.log_path, adapter_root, service.proc.pid)
    finally:
        service.stop()


#: Fixtures whose tests are ``slow``: what starts Ray, vLLM or the whole service takes tens of seconds.
SLOW_FIXTURES = {
    "real_service": "the one real service (Ray Serve, vLLM)",
    "url": "Ray Serve with the fake engine, in the test process (tests/test_scorer.py)",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by it
def pytest_collection_modifyitems(session, config, items) -> None:
    """Every test of a real engine, of the real service or of Ray Serve is ``slow`` (not in the fast tier,
    ``-m "not slow"``); so are the tests marked ``slow`` in their module (trainings, the cluster, commands that
    import vLLM or start Ray, installs from the network)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("engine") or fixtures & SLOW_FIXTURES.keys():
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session) -> None:
    """Note the last test (of those that run) that uses the shared service."""
    users = [item.nodeid for item in session.items if "real_service" in getattr(item, "fixturenames", ())]
    if users:
        session.config.stash[LAST_USER] = users[-1]


def stop_after_last_user(item) -> None:
    """Stop the shared service after its last user, so that later modules (cluster, training) have the machine."""
    if item.config.stash.get(LAST_USER, None) == item.nodeid:
        while _RUNNING:
            _RUNNING.pop().stop()


# ---------------------------------------------------------------- process-wide state: no test may leave it changed

#: The state when the first test started, taken again after each module that changed it (one change, one report).
_STATE = pytest.StashKey[dict]()
#: Each change seen since, and the test after whose teardown it was first seen.
_FIRST_SEEN = pytest.StashKey[dict]()
#: Environment variables that libraries set once, where none was, when first imported or initialised (OpenCV's
#: library path, OpenMP's and inductor's settings from torch, Ray's client mode): not a test's doing.
IMPORT_TIME_VARIABLES = frozenset(
    {"LD_LIBRARY_PATH", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "TORCHINDUCTOR_CACHE_DIR", "RAY_CLIENT_MODE"}
)


@contextmanager
def environment_and_signals_restored() -> Iterator[None]:
    """The block may change the environment and signal handlers (a Ray driver sets both); they are put back after."""
    environ, handlers = dict(os.environ), {n: signal.getsignal(n) for n in signal.Signals}
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        for n, handler in handlers.items():
            if signal.getsignal(n) != handler:
                signal.signal(n, handler)


def _process_state() -> dict[str, object]:
    """What a library may change for the whole process, and that outlives the code that changed it: vLLM's CPU
    worker replaces ``torch.set_num_threads`` and sets environment variables, the start method and
    ``sys.excepthook`` (see tests/engine_process.py); ``gc.freeze`` is vLLM's too; Ray sets signal handlers."""
    root = logging.getLogger()
    state: dict[str, object] = {
        "gc frozen objects": gc.get_freeze_count(),
        "gc enabled": gc.isenabled(),
        "gc thresholds": gc.get_threshold(),
        "sys.excepthook": sys.excepthook,
        "threading.excepthook": threading.excepthook,
        # unset until something asks for it, which sets the platform's default: only another method is a change
        "multiprocessing start method": multiprocessing.get_start_method(allow_none=True)
        or multiprocessing.get_all_start_methods()[0],
        "working directory": os.getcwd(),
        "CPU affinity": os.sched_getaffinity(0),
        "root logger level": root.level,
        # pytest's own capture handlers come and go with each test phase
        "root logger handlers": [h for h in root.handlers if not type(h).__module__.startswith("_pytest")],
        "logging.disable": logging.root.manager.disable,
    }
    state.update({f"environment variable {k}": v for k, v in os.environ.items()})
    state.update({f"{n.name} handler": signal.getsignal(n) for n in signal.Signals})
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):  # once imported (importing it takes seconds)
        state["torch threads"] = torch.get_num_threads()
        state["torch.set_num_threads"] = torch.set_num_threads  # vLLM's CPU worker puts a no-op in its place
    return state


def _changes(before: dict, after: dict) -> dict[str, str]:
    """What differs, each with its old and new value (a state first seen, such as torch's once imported, is not
    a change)."""
    said = {}
    for key in before.keys() | after.keys():
        if key.startswith("environment variable "):
            if key not in before and key.removeprefix("environment variable ") in IMPORT_TIME_VARIABLES:
                continue
            was, now = before.get(key, "(unset)"), after.get(key, "(unset)")
            if was != now:
                said[key] = "changed" if key in before and key in after else f"{was} -> {now}"[:200]
        elif key in before and key in after and before[key] != after[key]:
            said[key] = f"{before[key]!r} -> {after[key]!r}"[:300]
    return said


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if _STATE not in item.config.stash:
        import ray  # noqa: F401 - replaces sys.excepthook when first imported: the state starts with it imported

        item.config.stash[_STATE] = _process_state()
        item.config.stash[_FIRST_SEEN] = {}
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Once the test's fixtures that end with it are torn down: stop the shared service after its last user, and
    check the process-wide state.

    A module's own fixtures may change that state while its tests run (the Ray Serve of tests/test_scorer.py sets
    the environment its replicas inherit): once the module's fixtures are torn down, a change that remains fails
    the module's last test (an error at its teardown), naming the test after which it was first seen.
    """
    try:
        return (yield)
    finally:
        stop_after_last_user(item)
        stash = item.config.stash
        if _STATE in stash:
            before, after = stash[_STATE], _process_state()
            first_seen = stash[_FIRST_SEEN]
            changed = _changes(before, after)
            for key in changed:
                first_seen.setdefault(key, item.nodeid)
            if nextitem is None or nextitem.module is not item.module:
                stash[_STATE], stash[_FIRST_SEEN] = after, {}
                if changed:
                    pytest.fail(
                        "process-wide state left changed (later tests would run in it):\n  "
                        + "\n  ".join(
                            f"{key}: {what} (first seen after {first_seen[key]})" for key, what in changed.items()
                        ),
                        pytrace=False,
                    )
