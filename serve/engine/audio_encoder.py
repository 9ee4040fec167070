"""Qwen2-Audio's audio encoder run over each chunk's real frames only.

The Whisper feature extractor pads every chunk to 30 s (3000 mel frames) and
the published encoder attends over all 1500 positions, masking the padding
out of attention. Positions a chunk really has are therefore unaffected by
what lies past them, except through the two convolutions at the boundary, so
the encoder can be run on the frames it needs and no more:

- conv2 position ``j`` (stride 2) reads conv1 positions ``2j-1 .. 2j+1``, which
  read mel frames ``2j-2 .. 2j+2``; the ``F`` valid positions of a chunk thus
  need mel frames ``0 .. 2F`` (the first padding frames included, as the
  extractor made them) and nothing after;
- attention over the ``F`` valid positions alone equals attention over 1500
  positions with the padding masked to ``-inf`` (its weights are exactly 0);
- the average pooling and the final layer norm act position by position.

Chunks of the same length are encoded together, each other chunk on its own,
so no attention mask is ever built. An 8 s chunk costs about a quarter of the
padded encoder's work instead of all of it; the output equals the padded
encoder's within float rounding (checked in ``tests/test_audio_encoder.py``).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from serve.engine.transformers_private import encoder_output_lengths


def encode_valid_frames(tower: nn.Module, features: torch.Tensor, mel_lengths: torch.Tensor) -> list[torch.Tensor]:
    """Encoder outputs of each chunk's valid positions: ``[(tokens_i, d_model)]`` in input order.

    ``tower`` is a transformers ``Qwen2AudioEncoder``; ``features`` the padded
    log-mel features ``(n, mel_bins, 3000)``; ``mel_lengths`` the number of real
    frames of each (the feature attention mask summed).
    """
    conv_lengths, token_lengths = encoder_output_lengths(tower, mel_lengths)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(conv_lengths.tolist()):
        by_length[n].append(i)
    outputs: list[torch.Tensor | None] = [None] * len(conv_lengths)
    dtype, device = tower.conv1.weight.dtype, tower.conv1.weight.device
    for n, rows in by_length.items():
        frames = min(2 * n + 1, features.shape[-1])
        x = features[rows, :, :frames].to(dtype=dtype, device=device)
        x = nn.functional.gelu(tower.conv1(x))
        x = nn.functional.gelu(tower.conv2(x))[:, :, :n]
        x = x.permute(0, 2, 1) + tower.embed_positions.weight[:n]
        for layer in tower.layers:
            x = layer(x, None)
        x = tower.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
        x = tower.layer_norm(x)
        for k, i in enumerate(rows):
            outputs[i] = x[k, : int(token_lengths[i])]
    return outputs
