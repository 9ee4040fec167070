"""Whisper log-mel features computed over the audio, not over its zero padding.

Qwen2-Audio's processor pads every chunk with zeros to 30 s before the
short-time Fourier transform, so an 8 s chunk pays for 30 s of STFT, power
spectrum and mel projection. A frame whose window lies wholly in the zero
padding has exactly zero power, and each frame's value depends only on its own
window, so :class:`UnpaddedWhisperFeatureExtractor` transforms the audio up to
its last non-zero sample (plus one window), and fills the remaining frames
with the value zero power takes after the log, the clamp to ``peak - 8`` and
the scaling, as the padded computation does. The features equal transformers'
``WhisperFeatureExtractor`` to float rounding (``tests/test_log_mel.py``) at
about half the cost for a 14 s chunk.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from serve.engine.transformers_private import FbankHook


class UnpaddedWhisperFeatureExtractor(FbankHook, WhisperFeatureExtractor):
    """``WhisperFeatureExtractor`` whose STFT stops where the zero padding starts."""

    def log_mel(self, waveform: np.ndarray, device: str = "cpu") -> np.ndarray:
        """Log-mel features of a padded waveform (or a batch of them), as transformers computes them."""
        if self.dither != 0.0 or device != "cpu":  # dithered padding is not silent; GPU: not worth it
            return self.padded_log_mel(waveform, device)
        if waveform.ndim == 1:
            return self.unpadded_log_mel(waveform)
        return np.stack([self.unpadded_log_mel(row) for row in waveform])

    def unpadded_log_mel(self, samples: np.ndarray) -> np.ndarray:
        """Features ``(n_mels, len // hop)`` of one padded waveform."""
        hop, half = self.hop_length, self.n_fft // 2
        frames = len(samples) // hop  # the STFT's len // hop + 1 frames, less the last one (as Whisper does)
        nonzero = samples != 0
        end = len(samples) - int(np.argmax(nonzero[::-1])) if nonzero.any() else 0
        # Frame t reads samples [t*hop - half, t*hop + half): from `first_silent` on, only zeros.
        first_silent = min(frames, -(-(end + half) // hop))
        length = first_silent * hop + half  # every frame before `first_silent` reads only samples below this
        if length >= len(samples) or length <= half:  # nothing to save, or too short to reflect-pad
            return self.padded_log_mel(samples, "cpu")

        audio = torch.from_numpy(np.ascontiguousarray(samples[:length], dtype=np.float32))
        stft = torch.stft(audio, self.n_fft, hop, window=torch.hann_window(self.n_fft), return_complex=True)
        power = (stft[..., :first_silent].abs() ** 2).contiguous()
        mel = torch.from_numpy(self.mel_filters).to(torch.float32).T @ power
        log_spec = torch.clamp(mel, min=1e-10).log10()
        silent = torch.zeros(1).clamp(min=1e-10).log10()  # what a frame of zero power gives
        floor = torch.maximum(log_spec.max(), silent[0]) - 8.0
        out = torch.empty(mel.shape[0], frames)
        out[:, :first_silent] = torch.maximum(log_spec, floor)
        out[:, first_silent:] = torch.maximum(silent, floor)
        return ((out + 4.0) / 4.0).numpy()
