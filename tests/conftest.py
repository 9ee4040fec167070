"""Session fixtures: the generated tiny checkpoint and test audio."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.audio_fixtures import write

L2GRADER = str(Path(sys.executable).parent / "l2grader")
USER_KEY, ADMIN_KEY = "user-key-123", "admin-key-456"
USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def require_espeak() -> None:
    """Skip (fail on CI) where espeak-ng, which makes the synthetic speech, is missing."""
    if shutil.which("espeak-ng") is None:
        msg = "espeak-ng is not installed (scripts/install.sh installs it as root; apt-get install espeak-ng)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


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
            pcfg["adapter"] = str(tiny_dir / pcfg["adapter"])
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


@contextmanager
def running_service(config: Path, port: int, log_path: Path, ready_timeout_s: float = 400) -> Iterator[str]:
    """``l2grader serve --config CONFIG`` with the test API keys, until ``/readyz``; its process group ends after."""
    import httpx

    env = dict(os.environ, L2G_TEST_API_KEYS=USER_KEY, L2G_TEST_ADMIN_KEYS=ADMIN_KEY)
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [L2GRADER, "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + ready_timeout_s
    try:
        while True:
            assert proc.poll() is None, "service exited during start-up"
            log.seek(0)
            announced = f"listening on http://127.0.0.1:{port}" in log.read()
            try:
                if announced and httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "service not ready in time"
            time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def keyed_service_config(raw: dict, d: Path, **serving) -> Path:
    """Write ``raw`` (a tiny config) with the test API keys, a free port, a registry file and ``serving`` into ``d``."""
    import yaml

    from loadtest.service import free_port

    raw["serving"] = {
        "port": free_port(),
        "api_keys_env": "L2G_TEST_API_KEYS",
        "admin_keys_env": "L2G_TEST_ADMIN_KEYS",
        "registry_file": str(d / "registry.json"),
        **serving,
    }
    (d / "service.yaml").write_text(yaml.safe_dump(raw))
    return d / "service.yaml"
