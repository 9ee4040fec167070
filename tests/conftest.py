"""Session fixtures: the generated tiny checkpoint and test audio."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.audio_fixtures import write


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
