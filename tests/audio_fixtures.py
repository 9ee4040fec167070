"""Test audio. Where only bytes and formats matter (load tests, size limits, the doors with a fake engine):
speech-like audio made from numbers (:mod:`loadtest.audio`, shared with the load tests). Where speech must count as
speech (speech detection, quality, review): espeak-ng speech, made once per session by ``conftest.py``'s
``espeak_speech`` fixture, and sounds that are not speech at speech loudness (:func:`not_speech`: buzz, hum, tones,
music-like) as the negative cases."""

from __future__ import annotations

import numpy as np

from loadtest.audio import FORMATS, speechlike, write
from loadtest.vad_bench import SPEECH_DBFS, _level, buzz, hum, music, tones

__all__ = ["FORMATS", "NOT_SPEECH", "not_speech", "speechlike", "write"]

#: Sounds without speech, each a function of (samples, rng).
NOT_SPEECH = {
    "buzz": buzz,
    "hum 50 Hz": hum,
    "hum 60 Hz": lambda n, rng: hum(n, rng, 60.0),
    "tone 440 Hz": tones,
    "tones 350+440 Hz": lambda n, rng: tones(n, rng, (350.0, 440.0)),
    "music-like": music,
}


def not_speech(kind: str, seconds: float = 4.0, seed: int = 0, dbfs: float = SPEECH_DBFS) -> np.ndarray:
    """``seconds`` of a sound of :data:`NOT_SPEECH` at speech loudness (RMS ``dbfs``, -20 by default), 16 kHz."""
    return _level(NOT_SPEECH[kind](int(seconds * 16000), np.random.default_rng(seed)), dbfs)
