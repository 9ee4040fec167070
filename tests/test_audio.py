import numpy as np
import pytest
import soundfile as sf

from serve.grading import audio
from serve.grading.audio import (
    NOISE_MESSAGE,
    SAMPLE_RATE,
    AudioError,
    chunk_bounds,
    decode,
    pause_bounds,
    prepare,
    prepare_answer,
    split,
)
from serve.grading.config import AudioConfig
from tests.audio_fixtures import not_speech, speechlike


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


FRAME_S = 0.032  # Silero VAD's frames


def speech_mask(seconds: float, pauses: list[tuple[float, float]]) -> np.ndarray:
    """One bool per frame, all speech but the ``(start_s, length_s)`` pauses."""
    speech = np.ones(int(seconds / FRAME_S), bool)
    for start, length in pauses:
        speech[int(round(start / FRAME_S)) : int(round((start + length) / FRAME_S))] = False
    return speech


def cuts_of(seconds: float, pauses: list[tuple[float, float]], **settings) -> list[float]:
    """The inner boundaries (s) of ``seconds`` of speech with ``pauses``, after checking the chunks' shape."""
    n = int(round(seconds * SAMPLE_RATE))
    settings = {"search_s": 4.0, **settings}
    bounds = pause_bounds(n, 30.0, speech_mask(seconds, pauses), FRAME_S, **settings)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(bounds, bounds[1:]))
    assert all(0 < b - a <= 30 * SAMPLE_RATE for a, b in bounds)
    return [b / SAMPLE_RATE for _, b in bounds[:-1]]


@pytest.mark.parametrize("min_pause_s", [0.25, 0.0])
def test_a_long_pause_beats_a_short_dip_nearer_the_balanced_point(min_pause_s):
    # balanced point 25 s: a 32 ms dip 0.2 s after it, a 1 s pause 2 s before it (22.5-23.5 s)
    (cut,) = cuts_of(50, [(25.2, 0.032), (22.5, 1.0)], min_pause_s=min_pause_s)
    assert 22.9 <= cut <= 23.1  # the middle of the pause


def test_pauses_of_about_the_same_length_go_to_the_one_nearer_the_balanced_point():
    near, far = (27.008, 0.512), (21.504, 0.576)  # middles 2.3 s and 3.2 s from 25 s; both 5 steps of 0.1 s
    assert cuts_of(50, [near, far]) == pytest.approx([27.264], abs=0.02)
    longer = (21.12, 1.024)  # twice as long, 3.4 s away: it wins
    assert cuts_of(50, [near, longer]) == pytest.approx([21.632], abs=0.02)


ELEVENTHS = [round(300 / 11 * i - 1.5, 3) for i in range(1, 11)]  # 1.5 s before each balanced point of 11 chunks


@pytest.mark.parametrize(
    "seconds, middles, settings, expected",
    [
        (59, [29.7], {}, [29.7]),  # in reach of the balanced point (29.5 s)
        (59, [26.5], {}, [29.5]),  # its second chunk would last 32.5 s; three chunks cut speech as often
        (60, [30.0], {}, [30.0]),
        (60, [27.0], {}, [30.0]),  # the only cut two chunks allow; three would still cut speech once
        (60, [27.0, 44.0], {}, [27.0, 44.0]),  # one chunk more puts every cut in a pause
        (60, [27.0, 44.0], {"max_extra_chunks": 0}, [30.0]),
        (61, [19.0, 42.0], {}, [19.0, 42.0]),  # 1.3 s before and after the balanced points 20.3 s and 40.7 s
        (61, [11.0, 50.0], {}, [11.0, 30.5, 50.0]),  # out of reach of three chunks: four cut speech once, not twice
        (61, [11.0, 50.0], {"max_extra_chunks": 0}, [61 / 3, 122 / 3]),
        (300, ELEVENTHS, {}, ELEVENTHS),  # ten chunks must each last 30.0 s: eleven cut in the pauses
        (300, ELEVENTHS, {"max_extra_chunks": 0}, [30.0 * i for i in range(1, 10)]),
    ],
)
def test_cuts_go_to_pauses_in_reach(seconds, middles, settings, expected):
    assert cuts_of(seconds, [(m - 0.256, 0.512) for m in middles], **settings) == pytest.approx(expected, abs=0.02)


def pauses_every(low_s: float, high_s: float, seed: int) -> list[tuple[float, float]]:
    """0.3-0.8 s pauses over 900 s, ``low_s``-``high_s`` apart."""
    rng = np.random.default_rng(seed)
    pauses, t = [], 2.0
    while t < 898:
        pauses.append((t, rng.uniform(0.3, 0.8)))
        t += rng.uniform(low_s, high_s)
    return pauses


def test_a_900_s_answer_is_cut_in_its_pauses_not_at_multiples_of_30_s():
    for pauses, most_in_speech in [(pauses_every(1.0, 3.0, 7), 0), (pauses_every(3.0, 7.0, 7), 3)]:
        speech = speech_mask(900, pauses)
        cuts = cuts_of(900, pauses)
        assert len(cuts) == 30  # 31 chunks: the fewest, 30, would each last exactly 30.0 s
        assert sum(bool(speech[int(c / FRAME_S)]) for c in cuts) <= most_in_speech
        assert not any(abs(c - 30 * round(c / 30)) < 0.1 for c in cuts)
        assert cuts_of(900, pauses, max_extra_chunks=0) == pytest.approx([30.0 * i for i in range(1, 30)])


@pytest.mark.parametrize("seconds", [30.01, 45, 59.99, 60, 61, 75, 300, 899.99, 900])
def test_without_pauses_the_cuts_are_balanced(seconds):
    n = int(round(seconds * SAMPLE_RATE))
    for dips in ([], [(s, 0.2) for s in np.arange(1.0, seconds - 1, 2.0)]):  # dips shorter than min_pause_s
        speech = speech_mask(seconds, dips)
        assert pause_bounds(n, 30.0, speech, FRAME_S, 4.0) == chunk_bounds(n, 30.0)


def test_every_chunk_fits_whatever_the_pauses_and_settings():
    rng = np.random.default_rng(1)
    for _ in range(60):
        seconds = float(rng.uniform(30.0, 900.0))
        max_chunk_s = float(rng.choice([30.0, 29.99, 20.0, 7.5]))
        n = int(seconds * SAMPLE_RATE)
        speech = rng.random(int(seconds / FRAME_S)) < rng.uniform(0.5, 1.0)  # pauses of any length, anywhere
        extra = int(rng.integers(0, 3))
        bounds = pause_bounds(
            n, max_chunk_s, speech, FRAME_S, float(rng.uniform(0, 10)), float(rng.uniform(0, 1)), extra
        )
        fewest = len(chunk_bounds(n, max_chunk_s))
        assert fewest <= len(bounds) <= fewest + extra
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(b1 == a2 for (_, b1), (a2, _) in zip(bounds, bounds[1:]))
        assert all(0 < b - a <= round(max_chunk_s * SAMPLE_RATE) for a, b in bounds)


def test_window_argmax_is_the_first_largest_of_each_window():
    rng = np.random.default_rng(2)
    for size, width in [(1, 1), (10, 3), (50, 50), (300, 17), (300, 64), (1000, 255)]:
        values = rng.integers(0, 20, size)  # many equal values: the first of them is taken
        windows = np.lib.stride_tricks.sliding_window_view(values, width)
        expected = np.arange(windows.shape[0]) + np.argmax(windows, axis=1)
        assert np.array_equal(audio._window_argmax(values, width), expected)


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


def _wav(wave: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_silence_too_little_speech_and_noise(espeak_speech):
    cfg = AudioConfig(min_speech_s=1.0, silence_dbfs=-50)
    with pytest.raises(AudioError, match="silent") as e:
        prepare(_wav(np.zeros(5 * SAMPLE_RATE, np.float32)), cfg)
    assert e.value.kind == "silence"
    speech = espeak_speech[0]
    start = int(np.flatnonzero(np.abs(speech) > 0.01)[0])
    blip = np.zeros(5 * SAMPLE_RATE, np.float32)
    blip[: SAMPLE_RATE // 4] = speech[start : start + SAMPLE_RATE // 4]  # a quarter of a second of a word
    with pytest.raises(AudioError, match="too short") as e:
        prepare(_wav(blip), cfg)
    assert e.value.kind == "silence"
    with pytest.raises(AudioError) as e:  # as loud as speech, but no speech in it
        prepare(_wav(not_speech("buzz", 5.0)), cfg)
    assert (e.value.kind, str(e.value)) == ("noise", NOISE_MESSAGE)
    assert prepare(_wav(speech), cfg).quality.speech_s > 1.0


def test_prepare_answer(audio_dir):
    chunks = prepare_answer(audio_dir / "b.flac", AudioConfig())
    assert len(chunks) == 3
    assert chunks[-1].end_s == pytest.approx(75, abs=0.05)


# ---------------------------------------------------------------- formats clients record, hostile files


@pytest.mark.parametrize("fmt", ["webm", "m4a", "mp4", "aac", "ogg", "mp3", "flac"])
def test_recorded_formats_decode_like_the_wav(fmt):
    from loadtest.audio import encode

    wave = speechlike(8.0, seed=5)
    ref = decode(encode(wave, SAMPLE_RATE, "wav"))
    got = decode(encode(wave, SAMPLE_RATE, fmt))
    assert abs(len(got) - len(ref)) < 0.05 * SAMPLE_RATE  # AAC adds ~1024 samples of encoder delay
    rms = lambda x: float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))  # noqa: E731
    assert rms(got) == pytest.approx(rms(ref), rel=0.05)


def _wav_header(rate: int, channels: int, n_frames: int, bits: int = 16, fmt_tag: int = 1) -> bytes:
    import struct

    block = channels * bits // 8
    data_len = n_frames * block
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_len)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, fmt_tag, channels, rate, rate * block, block, bits)
        + b"data"
        + struct.pack("<I", data_len)
    )


def test_a_1_hz_wav_is_refused_before_decoding():
    data = _wav_header(1, 1, 800) + b"\x10\x00" * 800  # 800 "seconds" in 1.6 KB
    with pytest.raises(AudioError) as e:
        decode(data, max_duration_s=900)
    assert e.value.kind == "unsupported_audio" and "1 Hz" in str(e.value)


def test_more_than_8_channels_are_refused_before_decoding():
    data = _wav_header(16000, 64, 1600) + b"\x00\x01" * 64 * 1600
    with pytest.raises(AudioError) as e:
        decode(data)
    assert e.value.kind == "unsupported_audio" and "64 channels" in str(e.value)


def test_a_high_rate_many_channel_file_stops_at_the_input_budget():
    import io
    import time
    import tracemalloc

    import av

    buf = io.BytesIO()  # 384 kHz, 8 channels, 12 s of a constant: compresses to almost nothing
    with av.open(buf, mode="w", format="flac") as out:
        stream = out.add_stream("flac", rate=384000, layout="7.1")
        block = np.full((1, 8 * 38400), 1000, dtype=np.int16)
        for _ in range(120):
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="7.1")
            frame.sample_rate = 384000
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    data = buf.getvalue()
    assert len(data) < 200_000
    cfg = AudioConfig(max_duration_s=30)  # budget: 96,000 x 30 = 2.9 M input samples, the file holds 36.9 M
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(AudioError) as e:
        decode(data, max_duration_s=cfg.max_duration_s, max_input_samples=cfg.max_input_samples())
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert e.value.kind == "too_large"
    assert elapsed < 10
    assert peak < 30 * 1024 * 1024  # bounded by the 16 kHz mono output, not the 8 x 384 kHz input


def test_a_streaming_flac_without_total_samples_decodes():
    from loadtest.audio import encode

    data = bytearray(encode(speechlike(8.0, seed=6), SAMPLE_RATE, "flac"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    info = 8  # STREAMINFO body: total samples are the low 4 bits of byte 13 and bytes 14-17; then the MD5
    data[info + 13] &= 0xF0
    data[info + 14 : info + 18] = b"\0\0\0\0"
    data[info + 18 : info + 34] = b"\0" * 16
    wave = decode(bytes(data), max_duration_s=900)
    assert abs(len(wave) / SAMPLE_RATE - 8.0) < 0.01


def test_a_header_that_overstates_the_length_is_judged_by_the_samples():
    samples = (speechlike(3.0, seed=7) * 32767).astype("<i2").tobytes()
    data = _wav_header(16000, 1, 16000 * 3000) + samples  # says 50 min, holds 3 s
    wave = decode(data, max_duration_s=60)
    assert abs(len(wave) / SAMPLE_RATE - 3.0) < 0.01


def test_huge_float_samples_are_clipped_and_non_finite_ones_refused():
    loud = (speechlike(2.0, seed=8) * 1e30).astype("<f4")
    wave = decode(_wav_header(16000, 1, len(loud), bits=32, fmt_tag=3) + loud.tobytes())
    assert np.all(np.isfinite(wave)) and np.max(np.abs(wave)) <= 1.0
    bad = speechlike(2.0, seed=9).astype("<f4")
    bad[100] = np.nan
    with pytest.raises(AudioError) as e:
        decode(_wav_header(16000, 1, len(bad), bits=32, fmt_tag=3) + bad.tobytes())
    assert e.value.kind == "undecodable"


def test_decoding_stops_when_cancelled():
    from loadtest.audio import encode

    data = encode(speechlike(60.0, seed=10), SAMPLE_RATE, "flac")
    calls = []
    with pytest.raises(AudioError) as e:
        decode(data, cancelled=lambda: calls.append(1) or len(calls) > 3)
    assert e.value.kind == "cancelled" and len(calls) == 4
