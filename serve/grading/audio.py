"""Audio of an answer: decode, resample to 16 kHz mono, check it holds speech, cut it into chunks.

Qwen2-Audio's encoder hears at most 30 s; vLLM silently truncates anything
longer, so long answers are cut here into balanced chunks (75 s -> 3 x 25 s,
never 30 + 30 + 15) whose scores are averaged, weighted by duration.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """The audio cannot be scored; ``kind`` says why (for error counters and HTTP status codes)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Chunk:
    """One piece of an answer, as sent to the engine."""

    start_s: float
    end_s: float
    samples: np.ndarray  # float32, mono, 16 kHz

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def decode(data: bytes | str | Path, *, max_duration_s: float | None = None) -> np.ndarray:
    """Decode WAV/FLAC/OGG(Vorbis, Opus)/MP3 bytes or a file to float32 mono at 16 kHz.

    Raises :class:`AudioError` (kind ``empty``, ``undecodable`` or ``too_long``).
    """
    import soundfile as sf

    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as e:
            raise AudioError("unreadable", f"cannot read {data}: {e.strerror or e}") from None
    if len(data) == 0:
        raise AudioError("empty", "the audio is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            if max_duration_s is not None and f.frames > 0 and f.frames / rate > max_duration_s:
                raise AudioError(
                    "too_long", f"the audio lasts {f.frames / rate:.1f} s, more than the {max_duration_s:g} s allowed"
                )
            wave = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as e:  # libsndfile reports every format problem as a generic error
        detail = re.sub(r"^Error opening <[^>]*>: ", "", str(e).strip()) or type(e).__name__
        raise AudioError("undecodable", f"the audio cannot be decoded (not a supported audio format): {detail}") from None
    if wave.shape[0] == 0:
        raise AudioError("empty", "the audio holds no samples")
    mono = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    if not np.all(np.isfinite(mono)):
        raise AudioError("undecodable", "the audio holds non-finite samples")
    return resample(mono, rate)


def resample(wave: np.ndarray, rate: int) -> np.ndarray:
    """Resample mono float32 audio to 16 kHz (no-op when already there)."""
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(wave, dtype=np.float32)
    import librosa

    return librosa.resample(wave, orig_sr=rate, target_sr=SAMPLE_RATE, res_type="soxr_hq").astype(np.float32)


def voiced_seconds(wave: np.ndarray, silence_dbfs: float, frame_s: float = 0.025) -> float:
    """Seconds of audio whose frame RMS is above ``silence_dbfs``."""
    frame = int(SAMPLE_RATE * frame_s)
    n = len(wave) // frame
    if n == 0:
        return 0.0
    rms = np.sqrt(np.mean(wave[: n * frame].reshape(n, frame).astype(np.float64) ** 2, axis=1))
    return float(np.count_nonzero(rms > 10 ** (silence_dbfs / 20)) * frame_s)


def check_speech(wave: np.ndarray, *, min_speech_s: float, silence_dbfs: float) -> None:
    """Refuse silence and answers with too little sound to score (kind ``silence``)."""
    voiced = voiced_seconds(wave, silence_dbfs)
    if voiced < min_speech_s:
        total = len(wave) / SAMPLE_RATE
        what = "silent" if voiced == 0 else "too short to score"
        raise AudioError(
            "silence",
            f"the audio is {what}: {voiced:.2f} s of sound above {silence_dbfs:g} dBFS in {total:.2f} s, "
            f"at least {min_speech_s:g} s needed",
        )


def chunk_bounds(n_samples: int, max_chunk_s: float) -> list[tuple[int, int]]:
    """Split ``n_samples`` into the fewest chunks of at most ``max_chunk_s``, all of (nearly) equal length."""
    max_len = int(round(max_chunk_s * SAMPLE_RATE))
    n_chunks = max(1, math.ceil(n_samples / max_len))
    edges = [round(i * n_samples / n_chunks) for i in range(n_chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def split(wave: np.ndarray, max_chunk_s: float = 30.0) -> list[Chunk]:
    """Cut a 16 kHz answer into balanced chunks of at most ``max_chunk_s``."""
    return [
        Chunk(start_s=a / SAMPLE_RATE, end_s=b / SAMPLE_RATE, samples=wave[a:b])
        for a, b in chunk_bounds(len(wave), max_chunk_s)
    ]


def prepare_answer(data: bytes | str | Path, audio_cfg) -> list[Chunk]:
    """Decode, check and chunk one answer under the config's audio rules (:class:`serve.grading.config.AudioConfig`)."""
    wave = decode(data, max_duration_s=audio_cfg.max_duration_s)
    check_speech(wave, min_speech_s=audio_cfg.min_speech_s, silence_dbfs=audio_cfg.silence_dbfs)
    return split(wave, audio_cfg.max_chunk_s)
