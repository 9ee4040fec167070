"""The unpadded audio encoder equals transformers' padded, masked one on every real position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.engine.audio_encoder import encode_valid_frames
from serve.engine.transformers_private import encoder_output_lengths


@pytest.fixture(scope="module")
def tower_and_extractor(tiny_dir):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_dir / "model", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir / "model")
    return model.model.audio_tower, processor.feature_extractor


def padded_encoder(tower, features, mel_lengths) -> list[torch.Tensor]:
    """What transformers' Qwen2-Audio does: all 1500 positions, padding masked out of attention."""
    conv_lengths, token_lengths = encoder_output_lengths(tower, mel_lengths)
    positions = torch.arange((features.shape[-1] - 2) // 2 + 1)
    padding = positions[None, :] >= conv_lengths[:, None]
    mask = torch.zeros(len(features), 1, len(positions), len(positions))
    mask.masked_fill_(padding[:, None, None, :], float("-inf"))
    out = tower(features, attention_mask=mask).last_hidden_state
    return [out[i, : int(n)] for i, n in enumerate(token_lengths)]


def features_of(extractor, seconds: list[float], seed: int = 0):
    rng = np.random.default_rng(seed)
    waves = [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]
    got = extractor(waves, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    return got["input_features"], got["attention_mask"].sum(-1)


@pytest.mark.parametrize(
    "seconds",
    [
        [8.0, 20.0, 8.0, 13.37, 30.0],  # two of one length, a full 30 s chunk, odd frame counts
        [0.05, 29.99, 1.0],  # shortest and longest
    ],
)
def test_equals_padded_encoder(tower_and_extractor, seconds):
    tower, extractor = tower_and_extractor
    features, mel_lengths = features_of(extractor, seconds)
    with torch.no_grad():
        want = padded_encoder(tower, features, mel_lengths)
        got = encode_valid_frames(tower, features, mel_lengths)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-5), float((g - w).abs().max())


def test_padding_past_the_needed_frames_is_not_read(tower_and_extractor):
    """Garbage beyond frame 2F must not change the output (the encoder reads only what it needs)."""
    tower, extractor = tower_and_extractor
    features, mel_lengths = features_of(extractor, [10.0])
    n = int(encoder_output_lengths(tower, mel_lengths)[0])
    spoiled = features.clone()
    spoiled[:, :, 2 * n + 1 :] = 1e3
    with torch.no_grad():
        a = encode_valid_frames(tower, features, mel_lengths)[0]
        b = encode_valid_frames(tower, spoiled, mel_lengths)[0]
    assert torch.equal(a, b)
    spoiled[:, :, 2 * n] = 1e3  # the first frame it does need
    with torch.no_grad():
        c = encode_valid_frames(tower, spoiled, mel_lengths)[0]
    assert not torch.allclose(a, c)
