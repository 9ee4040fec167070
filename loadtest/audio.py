"""Speech-like audio made from numbers, for load tests, the benchmark and the test suite.

A voiced harmonic tone with a wandering pitch, a syllable-rate envelope and a
little noise: it passes the service's speech check, and every seed gives a
different answer (so caches keyed by the audio do not flatter the numbers).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

#: Formats libsndfile writes: the classic upload formats.
FORMATS = {
    "wav": dict(format="WAV", subtype="PCM_16"),
    "flac": dict(format="FLAC"),
    "ogg": dict(format="OGG", subtype="OPUS"),
    "mp3": dict(format="MP3"),
}

#: Formats browsers and phones record, written with FFmpeg (PyAV): container format, codec, sample format, rate.
RECORDED_FORMATS = {
    "webm": ("webm", "libopus", "flt", 48000),  # Chrome, Edge, Firefox MediaRecorder
    "m4a": ("ipod", "aac", "fltp", 44100),  # Safari / iOS voice memos
    "mp4": ("mp4", "aac", "fltp", 44100),
    "aac": ("adts", "aac", "fltp", 44100),  # raw AAC in ADTS frames
}


def speechlike(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Mono float32 audio that passes the speech check (Silero VAD hears it as speech): harmonics of a wandering
    pitch, 4-5 syllables a second, noise; the voice fades out before the end (a finished answer, not a cut-off one)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110 + 30 * rng.random() + 20 * np.sin(2 * np.pi * 0.4 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * (4 + rng.random()) * t)) ** 2  # 4-5 syllables a second
    # The voice fades out and 0.3 s of room noise ends the answer (a finished answer, not a cut-off one).
    fade, tail = min(t.size // 8, int(0.3 * rate)), min(t.size // 8, int(0.3 * rate))
    envelope[t.size - fade - tail : t.size - tail] *= np.linspace(1.0, 0.0, fade) ** 2
    envelope[t.size - tail :] = 0.0
    return (0.2 * voiced * envelope + 0.01 * rng.normal(size=t.size)).astype(np.float32)


def encode(wave: np.ndarray, rate: int, fmt: str = "wav") -> bytes:
    """The audio as a file's bytes in ``fmt``: wav, flac, ogg (Opus), mp3, webm (Opus), m4a, mp4, aac (ADTS).

    The recorded formats resample to their codec's usual rate.
    """
    if fmt in RECORDED_FORMATS:
        return _encode_ffmpeg(wave, rate, *RECORDED_FORMATS[fmt])
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, rate, **FORMATS[fmt])
    return buf.getvalue()


def _encode_ffmpeg(wave: np.ndarray, rate: int, container: str, codec: str, sample_format: str, out_rate: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=out_rate, layout="mono")
        resampler = av.AudioResampler(format=sample_format, layout="mono", rate=out_rate)
        step = rate // 10
        for start in range(0, len(wave) + 1, step):
            samples = wave[start : start + step]
            frames = [None]
            if len(samples):
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(samples[None, :], np.float32), format="flt", layout="mono"
                )
                frame.sample_rate = rate
                frames = [frame]
            for f in frames:
                for r in resampler.resample(f):
                    out.mux(stream.encode(r))
        out.mux(stream.encode(None))
    return buf.getvalue()


def answer_bytes(seconds: float, seed: int, fmt: str = "wav", rate: int = 16000) -> bytes:
    """One generated answer as file bytes."""
    return encode(speechlike(seconds, rate, seed), rate, fmt)


def write(path: Path, seconds: float, rate: int = 16000, seed: int = 0) -> Path:
    """Write speech-like audio in the format its suffix names."""
    Path(path).write_bytes(encode(speechlike(seconds, rate, seed), rate, Path(path).suffix[1:]))
    return Path(path)
