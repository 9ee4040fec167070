"""Audio quality of an answer, measured once on its decoded 16 kHz mono audio (numpy, one pass over frames).

- speech: frames of 25 ms whose RMS is above ``audio.silence_dbfs`` (the same
  rule as the speech check that refuses silence);
- SNR estimate: the mean power of the loudest 10 % of frames (speech plus
  noise) against that of the quietest 10 % (the noise floor), in dB; a
  recording with true silence between words has no floor and reads as
  :data:`MAX_SNR_DB`;
- clipping: the share of samples at full scale (``|x| >= 0.99``; decoding
  clips everything beyond full scale to 1);
- speech loudness: RMS of the speech frames, in dBFS.
"""

from __future__ import annotations

import numpy as np

from serve.grading.results import Quality

FRAME_S = 0.025
#: Samples at least this far towards full scale count as clipped.
CLIP_LEVEL = 0.99
#: Share of frames that make the noise floor (quietest) and the signal level (loudest).
EDGE_SHARE = 0.10
#: SNR reported when the noise floor is digital silence.
MAX_SNR_DB = 100.0
#: Power under which a frame counts as digital silence (-120 dBFS).
_FLOOR_POWER = 1e-12


def frame_powers(wave: np.ndarray, sample_rate: int, frame_s: float = FRAME_S) -> np.ndarray:
    """Mean square of each whole frame of ``frame_s`` seconds (float64)."""
    frame = int(sample_rate * frame_s)
    n = len(wave) // frame
    if n == 0:
        return np.zeros(0)
    x = wave[: n * frame].reshape(n, frame).astype(np.float64)
    return np.einsum("ij,ij->i", x, x) / frame


def voiced_mask(powers: np.ndarray, silence_dbfs: float) -> np.ndarray:
    """Frames whose RMS is above ``silence_dbfs``."""
    return powers > 10 ** (silence_dbfs / 10)


def _dbfs(power: float) -> float:
    return float(10 * np.log10(max(power, _FLOOR_POWER)))


def snr_db(powers: np.ndarray) -> float:
    """Loudest against quietest :data:`EDGE_SHARE` of frames, in dB, within [-MAX_SNR_DB, MAX_SNR_DB]."""
    if powers.size == 0:
        return 0.0
    k = max(1, int(round(EDGE_SHARE * powers.size)))
    ordered = np.sort(powers)
    noise, loud = float(ordered[:k].mean()), float(ordered[-k:].mean())
    if loud <= _FLOOR_POWER:
        return 0.0
    signal = max(loud - noise, _FLOOR_POWER)
    return float(np.clip(10 * np.log10(signal / max(noise, _FLOOR_POWER)), -MAX_SNR_DB, MAX_SNR_DB))


def measure(wave: np.ndarray, sample_rate: int, silence_dbfs: float) -> Quality:
    """The answer's :class:`Quality`."""
    powers = frame_powers(wave, sample_rate)
    voiced = voiced_mask(powers, silence_dbfs)
    speech_s = float(np.count_nonzero(voiced) * FRAME_S)
    duration_s = len(wave) / sample_rate
    clipped = float(np.count_nonzero(np.abs(wave) >= CLIP_LEVEL)) / max(1, len(wave))
    return Quality(
        speech_s=round(speech_s, 3),
        speech_ratio=round(min(1.0, speech_s / duration_s), 4) if duration_s > 0 else 0.0,
        snr_db=round(snr_db(powers), 2),
        clipped_fraction=round(clipped, 6),
        speech_dbfs=round(_dbfs(float(powers[voiced].mean())) if voiced.any() else _dbfs(0.0), 2),
    )
