"""Audio quality of an answer, measured once on its decoded 16 kHz mono audio (numpy, one pass over frames).

- speech: the frames the speech detector (:mod:`serve.grading.vad`) calls
  speech, the same frames as the speech check that refuses silence;
- noise floor: the median power of the frames without speech;
- SNR estimate: the speech frames' mean power (speech plus noise) less the
  floor, against the floor, in dB; a recording whose pauses are true silence
  has no floor and reads as :data:`MAX_SNR_DB`. Without pauses (or with the
  loudness rule, whose "pauses" are silent by definition) the loudest 10 % of
  frames against the quietest 10 %;
- the answer ends in speech: the speech detector's last frame is speech and
  the answer's last :data:`END_S` (the end of the signal itself, not of the
  detector's last whole frame) are within ``audio.cut_off_db`` of the speech
  frames' mean power: the recording was cut off mid-word. A finished word
  falls towards silence before the recording ends (or a pause follows it); a
  cut stops at speech loudness. ``loadtest/cutoff_bench.py`` measures the rule
  on espeak-ng answers kept whole, trimmed at their last word and cut mid-word
  (docs/trust.md);
- clipping: the share of samples at full scale (``|x| >= 0.99``; decoding
  clips everything beyond full scale to 1);
- speech loudness: RMS of the speech frames, in dBFS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve.grading.config import AudioConfig
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
#: Pauses shorter than this in all give no noise floor of their own (the loudest/quietest estimate is used).
MIN_PAUSE_S = 0.25
#: The end of an answer whose level :meth:`SpeechFrames.end_db` measures (s): a few pitch periods, short enough
#: that a finished word's fall towards silence shows in it.
END_S = 0.02
#: Default of ``audio.cut_off_db``: an answer whose end is within this many dB of its speech level ends mid-word.
CUT_OFF_DB: float = AudioConfig.model_fields["cut_off_db"].default


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


@dataclass(frozen=True)
class SpeechFrames:
    """An answer cut into frames: each frame's mean square and whether it is speech."""

    frame_s: float
    powers: np.ndarray  # mean square of each frame (float64)
    speech: np.ndarray  # bool per frame
    detector: str
    probabilities: np.ndarray | None = None  # speech probability per frame (silero_vad only)

    @property
    def speech_s(self) -> float:
        return float(np.count_nonzero(self.speech) * self.frame_s)

    def end_db(self, wave: np.ndarray, sample_rate: int = 16000) -> float | None:
        """The level of the answer's last :data:`END_S` against the speech frames' mean power, in dB (0: as loud
        as the speech); None where the detector's last frame is not speech (the answer ends in a pause)."""
        if not self.speech.size or not self.speech[-1]:
            return None
        end = np.asarray(wave[-int(END_S * sample_rate) :], np.float64)
        power = float(np.mean(end * end)) if end.size else 0.0
        return _dbfs(power) - _dbfs(float(self.powers[self.speech].mean()))

    def ends_in_speech(self, wave: np.ndarray, cut_off_db: float = CUT_OFF_DB, sample_rate: int = 16000) -> bool:
        """The answer was cut off mid-word: its last frame is speech and its last :data:`END_S` are within
        ``cut_off_db`` of the speech frames' mean power (:meth:`end_db`)."""
        level = self.end_db(wave, sample_rate)
        return level is not None and level >= -cut_off_db


def loudness(wave: np.ndarray, silence_dbfs: float) -> SpeechFrames:
    """The loudness rule: 25 ms frames whose RMS is above ``silence_dbfs``."""
    powers = frame_powers(wave, 16000)
    return SpeechFrames(FRAME_S, powers, voiced_mask(powers, silence_dbfs), "loudness")


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
    """The answer's :class:`Quality` by the loudness rule (frames above ``silence_dbfs`` are speech)."""
    assert sample_rate == 16000, "the grader measures 16 kHz audio"
    return measure_frames(wave, loudness(wave, silence_dbfs))


def measure_frames(wave: np.ndarray, frames: SpeechFrames, cut_off_db: float = CUT_OFF_DB) -> Quality:
    """The answer's :class:`Quality`, from its speech frames (:func:`serve.grading.vad.detect`); ``cut_off_db`` is
    ``audio.cut_off_db`` (:meth:`SpeechFrames.ends_in_speech`)."""
    powers, speech = frames.powers, frames.speech
    speech_s = frames.speech_s
    duration_s = len(wave) / 16000
    clipped = float(np.count_nonzero(np.abs(wave) >= CLIP_LEVEL)) / max(1, len(wave))
    pauses = powers[~speech]
    noise = None
    if frames.detector != "loudness" and pauses.size * frames.frame_s >= MIN_PAUSE_S:
        noise = float(np.median(pauses))
    if noise is not None and speech.any():
        signal = max(float(powers[speech].mean()) - noise, _FLOOR_POWER)
        snr = float(np.clip(10 * np.log10(signal / max(noise, _FLOOR_POWER)), -MAX_SNR_DB, MAX_SNR_DB))
    else:
        snr = snr_db(powers)
    return Quality(
        speech_s=round(speech_s, 3),
        speech_ratio=round(min(1.0, speech_s / duration_s), 4) if duration_s > 0 else 0.0,
        snr_db=round(snr, 2),
        clipped_fraction=round(clipped, 6),
        speech_dbfs=round(_dbfs(float(powers[speech].mean())) if speech.any() else _dbfs(0.0), 2),
        noise_dbfs=None if noise is None else round(_dbfs(noise), 2),
        ends_in_speech=frames.detector != "loudness" and frames.ends_in_speech(wave, cut_off_db),
        speech_detector=frames.detector,
    )
