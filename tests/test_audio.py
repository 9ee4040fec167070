import numpy as np
import pytest

from serve.grading.audio import SAMPLE_RATE, AudioError, check_speech, chunk_bounds, decode, prepare_answer, split
from serve.grading.config import AudioConfig
from tests.audio_fixtures import speechlike


@pytest.mark.parametrize(
    "seconds, n_chunks",
    [(5, 1), (20, 1), (30, 1), (30.01, 2), (45, 2), (60, 2), (61, 3), (75, 3), (600, 20)],
)
def test_chunks_are_few_and_balanced(seconds, n_chunks):
    n = int(seconds * SAMPLE_RATE)
    bounds = chunk_bounds(n, 30.0)
    assert len(bounds) == n_chunks
    lengths = [b - a for a, b in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(bounds, bounds[1:]))
    assert max(lengths) <= 30 * SAMPLE_RATE
    assert max(lengths) - min(lengths) <= 1  # no sliver chunk


def test_split_reports_times():
    chunks = split(np.zeros(75 * SAMPLE_RATE, dtype=np.float32))
    assert [(c.start_s, c.end_s) for c in chunks] == [(0, 25), (25, 50), (50, 75)]


@pytest.mark.parametrize("name", ["a.wav", "b.flac", "c.ogg", "d.mp3"])
def test_decode_formats_to_16k_mono(audio_dir, name):
    expected = {"a.wav": 20, "b.flac": 75, "c.ogg": 8, "d.mp3": 12}[name]
    wave = decode(audio_dir / name)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / SAMPLE_RATE - expected) < 0.1


def test_decode_downmixes_stereo(tmp_path):
    import soundfile as sf

    left = speechlike(2.0, 32000)
    sf.write(tmp_path / "s.wav", np.stack([left, np.zeros_like(left)], axis=1), 32000)
    wave = decode(tmp_path / "s.wav")
    assert len(wave) == 2 * SAMPLE_RATE
    assert np.max(np.abs(wave)) == pytest.approx(np.max(np.abs(left)) / 2, rel=0.1)


@pytest.mark.parametrize(
    "data, kind",
    [(b"", "empty"), (b"RIFF....WAVEjunk" * 10, "undecodable"), (b"\x00" * 1000, "undecodable")],
)
def test_bad_bytes(data, kind):
    with pytest.raises(AudioError) as e:
        decode(data)
    assert e.value.kind == kind
    assert "BytesIO" not in str(e.value)


def test_too_long_is_refused_before_decoding(audio_dir):
    with pytest.raises(AudioError) as e:
        decode(audio_dir / "b.flac", max_duration_s=60)
    assert e.value.kind == "too_long"


def test_silence_and_too_little_speech():
    with pytest.raises(AudioError, match="silent") as e:
        check_speech(np.zeros(5 * SAMPLE_RATE, np.float32), min_speech_s=1.0, silence_dbfs=-50)
    assert e.value.kind == "silence"
    blip = np.zeros(5 * SAMPLE_RATE, np.float32)
    blip[: SAMPLE_RATE // 4] = speechlike(0.25)
    with pytest.raises(AudioError, match="too short"):
        check_speech(blip, min_speech_s=1.0, silence_dbfs=-50)
    check_speech(speechlike(3.0), min_speech_s=1.0, silence_dbfs=-50)


def test_prepare_answer(audio_dir):
    chunks = prepare_answer(audio_dir / "b.flac", AudioConfig())
    assert len(chunks) == 3
    assert chunks[-1].end_s == pytest.approx(75, abs=0.05)
