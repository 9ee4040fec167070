"""The unpadded Whisper feature extractor gives transformers' features, padding frames included."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from serve.engine.log_mel import UnpaddedWhisperFeatureExtractor


@pytest.fixture(scope="module")
def extractors(tiny_dir):
    plain = WhisperFeatureExtractor.from_pretrained(tiny_dir / "model")
    return plain, UnpaddedWhisperFeatureExtractor.from_pretrained(tiny_dir / "model")


def speech_like(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    return (0.2 * np.sin(2 * np.pi * 180 * t) * rng.random(n) + 0.01 * rng.standard_normal(n)).astype(np.float32)


def features(extractor, waves):
    return extractor(waves, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="np")[
        "input_features"
    ]


@pytest.mark.parametrize("seconds", [0.02, 0.05, 1.0, 8.0, 13.37, 29.99, 30.0, 45.0])
def test_equals_whisper_features(extractors, seconds):
    plain, unpadded = extractors
    wave = speech_like(seconds, seed=int(seconds * 100))
    want, got = features(plain, [wave]), features(unpadded, [wave])
    assert got.shape == want.shape == (1, plain.feature_size, 3000)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_batches_and_trailing_or_inner_silence(extractors):
    plain, unpadded = extractors
    quiet_end = np.concatenate([speech_like(5, 1), np.zeros(16000 * 4, np.float32)])
    quiet_middle = np.concatenate([speech_like(3, 2), np.zeros(16000 * 2, np.float32), speech_like(3, 3)])
    loud = 0.9 * np.sign(speech_like(10, 4))  # a different peak, so a different floor
    waves = [quiet_end, quiet_middle, loud, np.zeros(16000 * 5, np.float32)]
    np.testing.assert_allclose(features(unpadded, waves), features(plain, waves), rtol=0, atol=1e-5)


def test_dither_falls_back_to_the_padded_path(extractors):
    plain, _ = extractors
    dithered = UnpaddedWhisperFeatureExtractor(**{**plain.to_dict(), "dither": 1e-4})
    wave = speech_like(5, 9)
    got = features(dithered, [wave])
    assert got.shape == (1, plain.feature_size, 3000)
    assert np.ptp(got[0, :, -100:]) > 0  # dithered padding is not silent: the padded path ran
