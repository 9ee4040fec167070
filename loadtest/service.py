"""Start ``l2grader serve`` on a free loopback port, wait until it is ready, measure its CPU, stop it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def l2grader_cmd() -> list[str]:
    """The ``l2grader`` of this interpreter (its console script, else ``python -m serve.cli``)."""
    script = Path(sys.executable).parent / "l2grader"
    return [str(script)] if script.exists() else [sys.executable, "-m", "serve.cli"]


def ensure_tiny_model(cfg) -> None:
    """Write the tiny checkpoint where an untrained config expects it, if it is not there yet."""
    base = Path(cfg.model.base)
    if not cfg.model.untrained or not base.is_absolute() or base.exists():
        return
    from adapters.tiny_model import make_tiny_model

    print(f"l2grader: writing the tiny UNTRAINED checkpoint to {base.parent} (missing)", file=sys.stderr, flush=True)
    make_tiny_model(base.parent)


def client_key(cfg, given: str | None) -> tuple[str | None, dict[str, str]]:
    """The key a load client sends, and the environment a service it starts needs so that it accepts that key.

    ``given`` wins; else the first key of the config's ``api_keys_env`` variable;
    else, when the config names such a variable, a fresh key for the run. A key
    variable the config names but the environment lacks gets a fresh key too
    (the service refuses to start without it).
    """
    import secrets

    from serve.service.auth import read_keys

    s = cfg.serving
    env = {
        name: secrets.token_hex(16)
        for name in (s.api_keys_env, s.admin_keys_env)
        if name and not read_keys(name, required=False)
    }
    if given and s.api_keys_env in env:
        env[s.api_keys_env] = given
    if given or not s.api_keys_env:
        return given, env
    return (env.get(s.api_keys_env) or read_keys(s.api_keys_env)[0]), env


def get_json(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback http URLs built here
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback http URLs built here
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.load(e)
        except ValueError:
            return e.code, {}


class Service:
    """``l2grader serve --config FILE`` as a subprocess (its own process group) on a free loopback port.

    With ``address`` it deploys into that Ray cluster instead of starting Ray.
    """

    def __init__(
        self,
        config: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 600,
        address: str | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(
            [
                *l2grader_cmd(),
                "serve",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *(["--address", address] if address else []),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the service exited during start-up (code {self.proc.returncode}); log: {self.log_path}\n"
                    + self.log_tail()
                )
            try:
                status, body = get_json(f"{self.url}/readyz", timeout=5)
                if status == 200 and body.get("ready") and self.announced():
                    return
            except (OSError, ValueError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the service was not ready within {timeout_s:.0f} s; log: {self.log_path}")
            time.sleep(1.0)

    def announced(self) -> bool:
        """Whether the service printed its start-up lines (log folder, metrics export, address) yet."""
        self._log.flush()
        return f"listening on {self.url}" in self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def pids(self) -> list[int]:
        """The service's whole process tree (Ray's processes, the replicas, the engine processes)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        self._log.close()


class TreeCpu:
    """CPU seconds (user + system) used by a set of process trees between ``start()`` and ``stop()``.

    Processes seen at the start and the end are sampled; children that start
    and exit in between are counted through their parents' reaped children time.
    """

    def __init__(self, root_pids):
        self.root_pids = list(root_pids)
        self._start: dict[tuple[int, float], tuple[str, float]] = {}
        #: CPU seconds of the last measure, by process kind (:func:`process_kind`).
        self.by_process: dict[str, float] = {}

    def _sample(self) -> dict[tuple[int, float], tuple[str, float]]:
        import psutil

        out = {}
        procs = []
        for pid in self.root_pids:
            try:
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for p in procs:
            try:
                t = p.cpu_times()
                used = t.user + t.system + t.children_user + t.children_system
                out[(p.pid, p.create_time())] = (process_kind(p), used)
            except psutil.NoSuchProcess:
                continue
        return out

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float:
        end = self._sample()
        self.by_process = {}
        for key, (kind, used) in end.items():
            spent = used - self._start.get(key, (kind, 0.0))[1]
            self.by_process[kind] = self.by_process.get(kind, 0.0) + spent
        return sum(self.by_process.values())


def process_kind(p) -> str:
    """What a process of the service is, for the per-process CPU table: Ray's process title (``ray::...``) or its
    program's name (haproxy, raylet, ...); one Ray driver or worker's title per kind."""
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        cmd = []
    title = cmd[0] if cmd else ""
    if title.startswith("ray::"):
        return title.split(" ")[0]
    if title.startswith("VLLM") or p.name().startswith("VLLM"):
        return p.name()
    name = p.name()
    if name.startswith("python") and any("l2grader" in c for c in cmd[:2]):
        return "l2grader serve"
    return name


def percentile(values, q: float) -> float:
    """``q``-th percentile (linear interpolation), 0 for no values."""
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else 0.0
