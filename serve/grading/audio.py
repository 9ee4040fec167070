"""Audio of an answer: decode (FFmpeg, through PyAV) to 16 kHz mono, check it holds speech, cut it into chunks.

Qwen2-Audio's encoder hears at most 30 s; vLLM silently truncates anything
longer, so long answers are cut here into balanced chunks (75 s -> 3 x 25 s,
never 30 + 30 + 15), their boundaries moved into pauses (:func:`pause_bounds`),
whose scores are averaged, weighted by duration.
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


#: The message of kind ``noise``: sound at speech loudness in which the speech detector finds no speech.
NOISE_MESSAGE = "no speech found: the recording holds noise or music"


def _refuse_noise(frames: quality.SpeechFrames, min_speech_s: float, silence_dbfs: float) -> None:
    """Kind ``noise``: Silero VAD finds less than ``min_speech_s`` of speech in an answer that holds at least that
    much sound louder than ``silence_dbfs`` (the loudness rule would take it for speech): buzz, hum, tones, music,
    steady noise. Quieter answers stay kind ``silence``."""
    if frames.detector == "loudness" or frames.speech_s >= min_speech_s:
        return
    loud_s = float(np.count_nonzero(quality.voiced_mask(frames.powers, silence_dbfs)) * frames.frame_s)
    if loud_s >= min_speech_s:
        raise AudioError("noise", NOISE_MESSAGE)


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


#: Pause lengths are compared in steps of this (s): pauses within one step of each other tie, and the one nearer
#: the balanced point wins.
PAUSE_STEP_S = 0.1
#: Most chunks :func:`pause_bounds` plans for (beyond them, balanced cuts): keeps its integer scores exact.
_MAX_PLANNED_CHUNKS = 256
#: Score of a cut (int64, summed over an answer's cuts): a cut in speech costs more than any sum of pause lengths
#: gains, and a step of pause length gains more than any sum of distances (in grid steps, capped) costs.
_IN_SPEECH, _PER_STEP, _MAX_DIST = 1 << 40, 1 << 20, (1 << 12) - 1
#: Pause lengths count up to this many steps (102.3 s: longer pauses tie), so that no sum of them outweighs a cut in
#: speech.
_MAX_STEPS = (1 << 10) - 1
_IMPOSSIBLE = -(1 << 62)


def pause_bounds(
    n_samples: int,
    max_chunk_s: float,
    speech: np.ndarray,
    frame_s: float,
    search_s: float,
    min_pause_s: float = 0.25,
    max_extra_chunks: int = 1,
) -> list[tuple[int, int]]:
    """Chunks of at most ``max_chunk_s`` whose inner boundaries fall in the longest pauses in reach.

    ``speech`` holds one bool per frame of ``frame_s``; a pause is a run of
    non-speech frames of at least ``min_pause_s``. With ``k`` chunks, each
    chunk lasts the balanced length ``n / k`` give or take ``2 * search_s``
    (each of its boundaries moved by up to ``search_s``), and at most
    ``max_chunk_s``. Among the cuts that allow, the plan puts the fewest
    boundaries in speech, then the longest pauses (lengths compared in steps
    of :data:`PAUSE_STEP_S`), then boundaries nearest their balanced points
    (``i * n / k``); a boundary sits in the middle of its pause, or as near it
    as the chunk lengths allow, and one in speech at its balanced point where
    its neighbours allow. It is found exactly, by dynamic programming over a
    grid of half frames, in time and memory linear in the answer's length.

    The fewest chunks are taken, unless up to ``max_extra_chunks`` more put
    fewer boundaries in speech (an answer of exactly 60 s can only be cut at
    30.0 s in two chunks; in three it can be cut in pauses); the fewest such.
    With no pause in reach the cuts are those of :func:`chunk_bounds`.
    """
    bounds = chunk_bounds(n_samples, max_chunk_s)
    if len(bounds) == 1 or speech.size == 0:
        return bounds
    max_len = int(round(max_chunk_s * SAMPLE_RATE))
    frame = int(round(frame_s * SAMPLE_RATE))
    grid = max(1, frame // 2)
    pauses = _Pauses(speech, frame, grid, n_samples, max(min_pause_s, 1e-9))
    best, best_in_speech = bounds, None
    for k in range(len(bounds), len(bounds) + max_extra_chunks + 1):
        if k > _MAX_PLANNED_CHUNKS or k * max_len < n_samples:
            break
        cuts = _plan(k, n_samples, max_len, int(round(search_s * SAMPLE_RATE)), grid, pauses)
        if cuts is None:
            continue
        in_speech = sum(not pauses.holds(c) for c in cuts)
        if best_in_speech is None or in_speech < best_in_speech:
            edges = [0, *cuts, n_samples]
            best, best_in_speech = list(zip(edges[:-1], edges[1:])), in_speech
        if in_speech == 0:
            break
    return best


class _Pauses:
    """The pauses of an answer on a grid of ``grid`` samples: for each grid point inside a pause (a run of
    non-speech frames of at least ``min_pause_s``), the pause's length in :data:`PAUSE_STEP_S` steps and the
    point's distance from the pause's middle; -1 outside pauses."""

    def __init__(self, speech: np.ndarray, frame: int, grid: int, n_samples: int, min_pause_s: float):
        edges = np.diff(np.concatenate([[1], speech.astype(np.int8), [1]]))
        starts, ends = np.flatnonzero(edges == -1) * frame, np.flatnonzero(edges == 1) * frame
        ends = np.minimum(ends, n_samples)
        keep = (ends - starts) >= min_pause_s * SAMPLE_RATE
        starts, ends = starts[keep], ends[keep]
        self.grid = grid
        n_points = n_samples // grid + 1
        self.steps = np.full(n_points, -1, np.int64)
        self.off_middle = np.zeros(n_points, np.int64)
        for a, b in zip(starts.tolist(), ends.tolist()):
            lo, hi = a // grid + 1, (b - 1) // grid  # grid points strictly inside the pause
            if lo > hi:
                continue
            middle = (a + b) / 2 / grid
            self.steps[lo : hi + 1] = min(int((b - a) / SAMPLE_RATE / PAUSE_STEP_S + 1e-9), _MAX_STEPS)
            self.off_middle[lo : hi + 1] = np.minimum(
                np.round(np.abs(np.arange(lo, hi + 1) - middle) * 2), _MAX_DIST
            ).astype(np.int64)

    def holds(self, sample: int) -> bool:
        """Whether a cut at ``sample`` falls in a pause."""
        return sample % self.grid == 0 and self.steps[sample // self.grid] >= 0

    def scores(self, first: int, last: int, balanced: float) -> np.ndarray:
        """The score of a boundary at each grid point ``first..last`` (see :data:`_IN_SPEECH`)."""
        points = np.arange(first, last + 1)
        steps, off = self.steps[first : last + 1], self.off_middle[first : last + 1]
        to_balanced = np.minimum(np.abs(points * self.grid - balanced) // self.grid, _MAX_DIST).astype(np.int64)
        # in a pause: its length, then its middle (an off-middle point loses half a step), then the balanced point
        in_pause = steps * _PER_STEP - np.where(off > 1, _PER_STEP // 2 + off, 0) - to_balanced
        return np.where(steps >= 0, in_pause, -_IN_SPEECH - to_balanced)


def _plan(k: int, n: int, max_len: int, search: int, grid: int, pauses: _Pauses) -> list[int] | None:
    """The best ``k - 1`` inner boundaries (samples, on the grid) under :func:`pause_bounds`' rules; None if the
    chunk lengths allow none on the grid."""
    lo_len = max(grid, math.ceil(n / k - 2 * search))
    hi_len = min(max_len, math.floor(n / k + 2 * search))
    if lo_len > hi_len:
        return None
    step_lo, step_hi = -(-lo_len // grid), hi_len // grid  # grid steps between neighbouring boundaries
    if step_lo > step_hi:
        return None
    # Grid points each boundary can reach at all, given the chunks before and after it.
    reach = []
    for i in range(1, k):
        first = -(-max(i * lo_len, n - (k - i) * hi_len) // grid)
        last = min(i * hi_len, n - (k - i) * lo_len) // grid
        if first > last:
            return None
        reach.append((first, last))
    first, last = reach[0]
    value = pauses.scores(first, last, n / k)
    back: list[np.ndarray] = []
    for i in range(2, k):
        prev_first, prev_last = first, last
        first, last = reach[i - 1]
        # value[p] = score(p) + max of the previous boundary's value over p - step_hi .. p - step_lo
        width = step_hi - step_lo + 1
        lo = first - step_hi
        padded = np.full(last - step_lo - lo + 1, _IMPOSSIBLE, np.int64)
        a, b = max(prev_first, lo), min(prev_last, last - step_lo)
        if a <= b:
            padded[a - lo : b - lo + 1] = value[a - prev_first : b - prev_first + 1]
        arg = _window_argmax(padded, width)
        best = padded[arg]
        back.append(lo + arg)
        value = np.where(best > _IMPOSSIBLE // 2, best + pauses.scores(first, last, i * n / k), _IMPOSSIBLE)
    # The last chunk's length is within bounds on every point of the last boundary's reach.
    if value.max() <= _IMPOSSIBLE // 2:
        return None
    p = first + int(np.argmax(value))
    points = [p]
    for i in range(k - 1, 1, -1):
        p = int(back[i - 2][p - reach[i - 1][0]])
        points.append(p)
    cuts = [q * grid for q in reversed(points)]
    if not any(pauses.holds(c) for c in cuts):
        return [round(i * n / k) for i in range(1, k)]  # chunk_bounds' cuts
    # A boundary in speech goes to its balanced point where its neighbours allow (chunk_bounds' point).
    for i, c in enumerate(cuts):
        if pauses.holds(c):
            continue
        target = round((i + 1) * n / k)
        before = cuts[i - 1] if i else 0
        after = cuts[i + 1] if i + 1 < len(cuts) else n
        if 0 < target - before <= max_len and 0 < after - target <= max_len:
            cuts[i] = target
    return cuts


def _window_argmax(values: np.ndarray, width: int) -> np.ndarray:
    """For each window ``values[i : i + width]``, the index of its largest value (the first of equals).

    A sparse table of the windows of 1, 2, 4, ... values: O(n log width) time,
    O(n) memory, where the windows as rows of a matrix would take n x width.
    """
    best = np.arange(values.size)
    span = 1
    while 2 * span <= width:
        left, right = best[: best.size - span], best[span:]
        best = np.where(values[right] > values[left], right, left)
        span *= 2
    n = values.size - width + 1
    left, right = best[:n], best[width - span : width - span + n]
    return np.where(values[right] > values[left], right, left)


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
    kind ``noise`` where the answer is loud enough to be speech, ``silence``
    otherwise) and the pauses long answers are cut in.
    """
    from serve.grading import vad  # here: torch and the speech model load only where answers are decoded

    wave = decode(
        data,
        max_duration_s=audio_cfg.max_duration_s,
        max_input_samples=audio_cfg.max_input_samples(),
        cancelled=cancelled,
    )
    frames = vad.detect(wave, audio_cfg)
    measured = quality.measure_frames(wave, frames, audio_cfg.cut_off_db)  # its speech_s is the speech check's
    _refuse_noise(frames, audio_cfg.min_speech_s, audio_cfg.silence_dbfs)
    _refuse_too_little_speech(
        measured.speech_s,
        len(wave) / SAMPLE_RATE,
        audio_cfg.min_speech_s,
        f"of sound above {audio_cfg.silence_dbfs:g} dBFS" if frames.detector == "loudness" else "of speech",
    )
    bounds = None
    if audio_cfg.cut_at_pauses:
        bounds = pause_bounds(
            len(wave),
            audio_cfg.max_chunk_s,
            frames.speech,
            frames.frame_s,
            audio_cfg.pause_search_s,
            audio_cfg.min_pause_s,
            audio_cfg.max_extra_chunks,
        )
    return PreparedAnswer(split(wave, audio_cfg.max_chunk_s, bounds), measured)


def prepare_answer(data: bytes | str | Path, audio_cfg, cancelled: Callable[[], bool] | None = None) -> list[Chunk]:
    """The chunks of :func:`prepare` (for callers that need no quality: training, benchmarks)."""
    return prepare(data, audio_cfg, cancelled).chunks
