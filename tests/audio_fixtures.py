"""Speech-like test audio made from numbers (a voiced harmonic tone with a syllable-rate envelope)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def speechlike(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Mono float32 audio that passes the speech check: harmonics of a wandering pitch, 4 Hz syllables, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110 + 30 * rng.random() + 20 * np.sin(2 * np.pi * 0.4 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * (3 + rng.random() * 2) * t)) ** 2
    return (0.2 * voiced * envelope + 0.01 * rng.normal(size=t.size)).astype(np.float32)


FORMATS = {
    "wav": dict(format="WAV", subtype="PCM_16"),
    "flac": dict(format="FLAC"),
    "ogg": dict(format="OGG", subtype="OPUS"),
    "mp3": dict(format="MP3"),
}


def write(path: Path, seconds: float, rate: int = 16000, seed: int = 0) -> Path:
    """Write speech-like audio in the format its suffix names."""
    sf.write(path, speechlike(seconds, rate, seed), rate, **FORMATS[path.suffix[1:]])
    return path
