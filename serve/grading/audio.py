"""Audio of an answer: decode (FFmpeg, through PyAV) to 16 kHz mono, check it holds speech, cut it into chunks.

Qwen2-Audio's encoder hears at most 30 s; vLLM silently truncates anything
longer, so long answers are cut here into balanced chunks (75 s -> 3 x 25 s,
never 30 + 30 + 15) whose scores are averaged, weighted by duration.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.grading import quality
from serve.grading.config import clip
from serve.grading.results import Quality

logger = logging.getLogger(__name__)

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


#: Input sample rates below this are refused (no speech recording is made that way; 1 Hz "audio" would
#: count as hours of answer from a few bytes).
MIN_INPUT_RATE = 8000
#: More input channels than this are refused before decoding.
MAX_INPUT_CHANNELS = 8


def decode(
    data: bytes | str | Path,
    *,
    max_duration_s: float | None = None,
    max_input_samples: int | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Decode any audio FFmpeg reads (WAV, FLAC, OGG, MP3, WebM/Opus, MP4/M4A/AAC, ...) to float32 mono at 16 kHz.

    Streaming: the input is decoded block by block, each block's channels
    averaged and the result resampled (FFmpeg's resampler), so memory is
    bounded by the 16 kHz mono output, never by the input's rate or channel
    count. FFmpeg (through PyAV) reads every format; WAV goes through
    libsndfile, up to 10x faster on it, under the same checks. Limits are
    checked while decoding, on what the file really holds (its header may
    under- or over-state its length):

    - a sample rate below :data:`MIN_INPUT_RATE` or more than
      :data:`MAX_INPUT_CHANNELS` channels: kind ``unsupported_audio``, before decoding;
    - decoded audio longer than ``max_duration_s``: ``too_long``, at once;
    - more than ``max_input_samples`` input samples (rate x channels x seconds): ``too_large``;
    - non-finite samples: ``undecodable``; samples beyond full scale are clipped to [-1, 1];
    - ``cancelled()`` true (the client left): ``cancelled``.

    Raises :class:`AudioError` (kinds above, ``empty``, ``undecodable``, ``unreadable``).
    """
    import av  # here: vLLM's processes load this module (Chunk) and need no decoder

    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as e:
            raise AudioError("unreadable", f"cannot read {data}: {e.strerror or e}") from None
    if len(data) == 0:
        raise AudioError("empty", "the audio is empty (0 bytes)")
    max_out = None if max_duration_s is None else int(max_duration_s * SAMPLE_RATE)
    pieces: list[np.ndarray] = []
    n_out = n_in = 0
    to_16k = _Resampler()
    try:
        for mono, rate, channels in _blocks(data):
            n_in += mono.size * channels
            if max_input_samples is not None and n_in > max_input_samples:
                raise AudioError(
                    "too_large",
                    f"the audio holds more than {max_input_samples} input samples "
                    "(rate x channels x seconds) allowed for one answer",
                )
            for out in to_16k.push(mono, rate):
                pieces.append(out)
                n_out += out.size
            if max_out is not None and n_out > max_out:
                raise AudioError("too_long", f"the audio lasts more than the {max_duration_s:g} s allowed")
            if cancelled is not None and cancelled():
                raise AudioError("cancelled", "decoding stopped: the request was cancelled")
        pieces.extend(to_16k.flush())
    except AudioError:
        raise
    except (av.FFmpegError, ValueError, EOFError, OverflowError, RuntimeError) as e:
        # The decoder's own words (FFmpeg's "[Errno 1094995529] Invalid data found ...") go to the log only.
        logger.info("undecodable audio: %s", clip(str(e) or type(e).__name__, 300))
        raise AudioError(
            "undecodable",
            "the audio cannot be decoded: the file is not audio in a format we can read "
            "(WAV, FLAC, MP3, Ogg, Opus, WebM, M4A/AAC and the like)",
        ) from None
    wave = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if wave.size == 0:
        raise AudioError("empty", "the audio holds no samples")
    if max_out is not None and wave.size > max_out:
        raise AudioError("too_long", f"the audio lasts more than the {max_duration_s:g} s allowed")
    if not np.all(np.isfinite(wave)):
        raise AudioError("undecodable", "the audio holds non-finite samples")
    return np.clip(wave, -1.0, 1.0, out=wave)


#: Frames libsndfile reads at a time.
_SNDFILE_BLOCK = 65536


def _blocks(data: bytes) -> Iterator[tuple[np.ndarray, int, int]]:
    """(mono float32 block, its sample rate, the input's channels), checked before any sample is read."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        import soundfile as sf  # here: vLLM's processes load this module (Chunk) and need no decoder

        try:
            f = sf.SoundFile(io.BytesIO(data))
        except (sf.LibsndfileError, RuntimeError, ValueError):
            f = None  # a WAV codec libsndfile lacks: FFmpeg may have it
        if f is not None:
            with f:
                _check_input(f.samplerate, f.channels)
                for block in f.blocks(_SNDFILE_BLOCK, dtype="float32", always_2d=True):
                    yield (
                        (block.mean(axis=1, dtype=np.float32) if f.channels > 1 else block[:, 0]),
                        f.samplerate,
                        f.channels,
                    )
            return
    import av  # here: vLLM's processes load this module (Chunk) and need no decoder

    with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise AudioError("undecodable", "the file holds no audio stream")
        stream = container.streams.audio[0]
        _check_input(stream.codec_context.sample_rate, stream.codec_context.channels)
        for frame in container.decode(stream):
            channels = frame.layout.nb_channels
            _check_input(frame.sample_rate, channels)
            yield _mono(frame), frame.sample_rate, channels


def _check_input(rate: int | None, channels: int | None) -> None:
    if rate and rate < MIN_INPUT_RATE:
        raise AudioError("unsupported_audio", f"sample rate {rate} Hz is below the {MIN_INPUT_RATE} Hz accepted")
    if channels and channels > MAX_INPUT_CHANNELS:
        raise AudioError("unsupported_audio", f"{channels} channels: at most {MAX_INPUT_CHANNELS} are accepted")


#: Full scale of the integer sample formats (FFmpeg's names, planar or not).
_FULL_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2.0**31, "s64": 2.0**63}


def _mono(frame) -> np.ndarray:
    """The mean of a decoded frame's channels, float32 at full scale 1.

    Done here rather than by FFmpeg's resampler: its channel rematrixing does
    not average (and PyAV's resampler crashed on some many-channel layouts).
    """
    channels = frame.layout.nb_channels
    samples = frame.to_ndarray()
    samples = samples.reshape(channels, -1) if frame.format.is_planar else samples.reshape(-1, channels).T
    name = frame.format.name.rstrip("p")
    if channels == 1 and name == "flt":
        return samples[0]
    mono = samples.mean(axis=0, dtype=np.float64) if channels > 1 else samples[0].astype(np.float64)
    if name == "u8":
        mono -= 128.0
    return (mono / _FULL_SCALE.get(name, 1.0)).astype(np.float32)


class _Resampler:
    """FFmpeg's resampler to 16 kHz mono, fed in blocks of at least :attr:`BLOCK` samples (fewer calls)."""

    BLOCK = 16384

    def __init__(self) -> None:
        import av  # here: vLLM's processes load this module (Chunk) and need no decoder

        self._av = av
        self._resampler = None
        self._rate: int | None = None
        self._pending: list[np.ndarray] = []
        self._n = 0

    def push(self, mono: np.ndarray, rate: int) -> list[np.ndarray]:
        if self._rate is not None and rate != self._rate:
            raise ValueError(f"the sample rate changes within the stream ({self._rate} -> {rate} Hz)")
        self._rate = rate
        self._pending.append(mono)
        self._n += mono.size
        return self._drain() if self._n >= self.BLOCK else []

    def flush(self) -> list[np.ndarray]:
        out = self._drain()
        if self._resampler is not None:
            out += [f.to_ndarray().reshape(-1) for f in self._resampler.resample(None)]
        return out

    def _drain(self) -> list[np.ndarray]:
        if not self._pending:
            return []
        block = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._n = [], 0
        if self._rate == SAMPLE_RATE:
            return [np.array(block, dtype=np.float32)]
        if self._resampler is None:
            self._resampler = self._av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        frame = self._av.AudioFrame.from_ndarray(np.ascontiguousarray(block[None, :]), format="flt", layout="mono")
        frame.sample_rate = self._rate
        return [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]


def _refuse_too_little_speech(voiced: float, total: float, min_speech_s: float, what_counts: str) -> None:
    if voiced < min_speech_s:
        what = "silent" if voiced == 0 else "too short to score"
        raise AudioError(
            "silence",
            f"the audio is {what}: {voiced:.2f} s {what_counts} in {total:.2f} s, at least {min_speech_s:g} s needed",
        )


def chunk_bounds(n_samples: int, max_chunk_s: float) -> list[tuple[int, int]]:
    """Split ``n_samples`` into the fewest chunks of at most ``max_chunk_s``, all of (nearly) equal length."""
    max_len = int(round(max_chunk_s * SAMPLE_RATE))
    n_chunks = max(1, math.ceil(n_samples / max_len))
    edges = [round(i * n_samples / n_chunks) for i in range(n_chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def pause_bounds(
    n_samples: int, max_chunk_s: float, speech: np.ndarray, frame_s: float, search_s: float
) -> list[tuple[int, int]]:
    """The chunks of :func:`chunk_bounds`, each inner boundary moved into the pause nearest it.

    A boundary moves at most ``search_s`` from its balanced point, to the
    middle of the nearest run of non-speech frames (``speech``: one bool per
    frame of ``frame_s``) that reaches that window, and only as far as every
    chunk stays within ``max_chunk_s``; with no pause in reach it stays put.
    """
    bounds = chunk_bounds(n_samples, max_chunk_s)
    if len(bounds) == 1 or speech.size == 0:
        return bounds
    max_len = int(round(max_chunk_s * SAMPLE_RATE))
    frame, search = int(round(frame_s * SAMPLE_RATE)), int(round(search_s * SAMPLE_RATE))
    # Pauses as [start, end) sample ranges.
    edges = np.diff(np.concatenate([[1], speech.astype(np.int8), [1]]))
    starts, ends = np.flatnonzero(edges == -1) * frame, np.flatnonzero(edges == 1) * frame
    cuts, prev, k = [0], 0, len(bounds)
    for i, (_, balanced) in enumerate(bounds[:-1], start=1):
        lo = max(balanced - search, prev + 1, n_samples - (k - i) * max_len)
        hi = min(balanced + search, prev + max_len, n_samples - 1)
        best = min(max(balanced, lo), hi)
        a, b = np.maximum(starts, lo), np.minimum(ends, hi)  # each pause clipped to the window
        mids = ((a + b) // 2)[a < b]
        if mids.size:
            best = int(mids[np.argmin(np.abs(mids - balanced))])
        cuts.append(best)
        prev = best
    cuts.append(n_samples)
    return list(zip(cuts[:-1], cuts[1:]))


def split(wave: np.ndarray, max_chunk_s: float = 30.0, bounds: list[tuple[int, int]] | None = None) -> list[Chunk]:
    """Cut a 16 kHz answer into chunks: ``bounds`` (sample ranges), by default balanced ones of at most
    ``max_chunk_s``."""
    return [
        Chunk(start_s=a / SAMPLE_RATE, end_s=b / SAMPLE_RATE, samples=wave[a:b])
        for a, b in (bounds or chunk_bounds(len(wave), max_chunk_s))
    ]


@dataclass(frozen=True)
class PreparedAnswer:
    """An answer ready for the engine: its chunks, and its audio quality measured on the whole answer."""

    chunks: list[Chunk]
    quality: Quality


def prepare(data: bytes | str | Path, audio_cfg, cancelled: Callable[[], bool] | None = None) -> PreparedAnswer:
    """Decode, check, measure and chunk one answer under the config's audio rules
    (:class:`serve.grading.config.AudioConfig`).

    The speech detector (:mod:`serve.grading.vad`) runs once on the decoded
    audio: its frames give the quality, the speech check (too little speech:
    kind ``silence``) and the pauses long answers are cut in.
    """
    from serve.grading import vad  # here: torch and the speech model load only where answers are decoded

    wave = decode(
        data,
        max_duration_s=audio_cfg.max_duration_s,
        max_input_samples=audio_cfg.max_input_samples(),
        cancelled=cancelled,
    )
    frames = vad.detect(wave, audio_cfg)
    measured = quality.measure_frames(wave, frames)  # its speech_s is the speech check's
    _refuse_too_little_speech(
        measured.speech_s,
        len(wave) / SAMPLE_RATE,
        audio_cfg.min_speech_s,
        f"of sound above {audio_cfg.silence_dbfs:g} dBFS" if frames.detector == "loudness" else "of speech",
    )
    bounds = None
    if audio_cfg.cut_at_pauses:
        bounds = pause_bounds(len(wave), audio_cfg.max_chunk_s, frames.speech, frames.frame_s, audio_cfg.pause_search_s)
    return PreparedAnswer(split(wave, audio_cfg.max_chunk_s, bounds), measured)


def prepare_answer(data: bytes | str | Path, audio_cfg, cancelled: Callable[[], bool] | None = None) -> list[Chunk]:
    """The chunks of :func:`prepare` (for callers that need no quality: training, benchmarks)."""
    return prepare(data, audio_cfg, cancelled).chunks
