"""Speech detection by Silero VAD: the model as packaged, noise told from speech, cut-off answers, pause cutting."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from loadtest import vad_bench
from loadtest.audio import encode
from serve.grading import vad
from serve.grading.audio import NOISE_MESSAGE, SAMPLE_RATE, AudioError, pause_bounds, prepare
from serve.grading.config import AudioConfig
from tests.audio_fixtures import NOT_SPEECH, not_speech

VAD = AudioConfig()
LOUDNESS = AudioConfig(speech_detector="loudness")


@pytest.fixture
def speech(espeak_speech) -> list[np.ndarray]:
    """Two espeak-ng answers (pauses between words, silence around), speech at -20 dBFS (made once per session)."""
    return espeak_speech


def test_batched_probabilities_equal_the_packages_frame_by_frame_model(speech):
    import importlib.metadata

    import torch

    wave = speech[0][: 4 * SAMPLE_RATE]
    path = importlib.metadata.distribution("silero-vad").locate_file("silero_vad/data/silero_vad.jit")
    ref_model = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.inference_mode():
        ref = [float(ref_model(torch.from_numpy(wave[i : i + 512]), 16000)) for i in range(0, len(wave) - 511, 512)]
    ours = vad.model().probabilities(wave, threads=1)
    assert ours.shape == (len(ref),)
    assert np.max(np.abs(ours - np.array(ref))) < 1e-4


def test_threads_share_one_model_and_torch_threads_are_restored(speech):
    import torch

    waves = [speech[0], speech[1], speech[0][::-1].copy(), speech[1] * 0.1]
    serial = [vad.silero(w).probabilities for w in waves]
    before = torch.get_num_threads()
    out: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        for _ in range(3):
            out[i] = vad.silero(waves[i]).probabilities

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(waves))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(np.array_equal(out[i], serial[i]) for i in range(len(waves)))
    assert torch.get_num_threads() == before
    assert vad.model() is vad.model()


@pytest.mark.parametrize("kind", ["white", "pink", "hum", "music", "clicks"])
def test_noise_hum_music_and_clicks_at_speech_loudness_are_not_scorable(kind):
    rng = np.random.default_rng(0)
    wave = getattr(vad_bench, kind)(6 * SAMPLE_RATE, rng)
    wave = wave if kind == "clicks" else vad_bench._level(wave, vad_bench.SPEECH_DBFS)
    data = encode(wave, SAMPLE_RATE)
    with pytest.raises(AudioError) as e:
        prepare(data, VAD)
    if kind == "clicks":  # too little sound above audio.silence_dbfs to be speech: silence
        assert e.value.kind == "silence" and "of speech" in str(e.value)
    else:  # sound at speech loudness without speech
        assert e.value.kind == "noise" and str(e.value) == NOISE_MESSAGE
        assert prepare(data, LOUDNESS).quality.speech_ratio > 0.9  # the loudness rule takes them for speech


@pytest.mark.parametrize("kind", sorted(NOT_SPEECH))
def test_buzz_hum_tones_and_music_are_noise_not_silence_nor_speech(kind):
    data = encode(not_speech(kind, 4.0, seed=3), SAMPLE_RATE)
    with pytest.raises(AudioError) as e:
        prepare(data, VAD)
    assert (e.value.kind, str(e.value)) == ("noise", "no speech found: the recording holds noise or music")
    with pytest.raises(AudioError) as quiet:  # the same sound under audio.silence_dbfs is silence
        prepare(encode(not_speech(kind, 4.0, seed=3, dbfs=-60), SAMPLE_RATE), VAD)
    assert quiet.value.kind == "silence"


def test_silence_keeps_its_kind_and_speech_is_heard_over_a_buzz(speech):
    with pytest.raises(AudioError) as e:
        prepare(encode(np.zeros(4 * SAMPLE_RATE, np.float32), SAMPLE_RATE), VAD)
    assert e.value.kind == "silence" and "silent" in str(e.value)
    assert prepare(encode(speech[1], SAMPLE_RATE), VAD).quality.speech_s > 2.0
    buzzed = speech[1] + not_speech("buzz", speech[1].size / SAMPLE_RATE, dbfs=vad_bench.SPEECH_DBFS - 20)
    assert prepare(encode(buzzed, SAMPLE_RATE), VAD).quality.speech_s > 2.0  # speech over a quiet buzz is speech


def test_quiet_clean_speech_is_heard(speech):
    quiet = speech[0] * 10 ** (-35 / 20)  # voiced frames at -55 dBFS, under audio.silence_dbfs
    data = encode(quiet, SAMPLE_RATE, "flac")
    q = prepare(data, VAD).quality
    assert q.speech_detector == "silero_vad" and q.speech_s > 2.0 and q.speech_dbfs < -50
    with pytest.raises(AudioError):
        prepare(data, LOUDNESS)


def test_noise_floor_and_snr_come_from_the_pauses(speech):
    rng = np.random.default_rng(1)
    clean = prepare(encode(speech[0], SAMPLE_RATE), VAD).quality
    assert clean.snr_db > 60 and not clean.ends_in_speech
    noisy = speech[0] + vad_bench._level(vad_bench.white(speech[0].size, rng), vad_bench.SPEECH_DBFS - 10)
    q = prepare(encode(noisy, SAMPLE_RATE), VAD).quality
    assert q.noise_dbfs == pytest.approx(-30, abs=3) and 5 < q.snr_db < 15


def test_a_recording_cut_off_mid_speech_ends_in_speech(speech):
    wave = speech[1]
    frames = vad.silero(wave)
    middle = slice(frames.powers.size // 3, 2 * frames.powers.size // 3)
    loudest = middle.start + int(np.argmax(frames.powers[middle] * frames.probabilities[middle]))
    cut = (loudest + 1) * vad.FRAME  # in the middle of a word
    assert prepare(encode(wave[:cut], SAMPLE_RATE), VAD).quality.ends_in_speech
    assert not prepare(encode(wave, SAMPLE_RATE), VAD).quality.ends_in_speech


def test_pause_bounds_move_each_cut_into_a_pause_in_reach_within_bounds():
    frame_s = 0.032
    n = int(75 * SAMPLE_RATE)  # balanced: 25 s, 50 s
    speech = np.ones(int(75 / frame_s), bool)
    speech[int(23.0 / frame_s) : int(23.5 / frame_s)] = False  # a pause 2 s before the first balanced point
    speech[int(56.0 / frame_s) : int(56.4 / frame_s)] = False  # 6 s after the second: out of reach
    bounds = pause_bounds(n, 30.0, speech, frame_s, 4.0)
    (a0, a1), (b0, b1), (c0, c1) = bounds
    assert a0 == 0 and c1 == n and a1 == b0 and b1 == c0
    assert 23.0 <= a1 / SAMPLE_RATE <= 23.5
    assert b1 == 50 * SAMPLE_RATE
    assert max(b - a for a, b in bounds) <= 30 * SAMPLE_RATE
    # a pause in reach that would make a chunk longer than 30 s is not taken
    n = int(59 * SAMPLE_RATE)  # balanced 29.5 s; the pause at 27 s would leave 32 s after it: it stays
    speech = np.ones(int(59 / frame_s), bool)
    speech[int(27.0 / frame_s) : int(27.3 / frame_s)] = False
    (_, cut), _ = pause_bounds(n, 30.0, speech, frame_s, 4.0)
    assert (
        cut == int(29.5 * SAMPLE_RATE)
        and max(b - a for a, b in pause_bounds(n, 30.0, speech, frame_s, 4.0)) <= 30 * SAMPLE_RATE
    )


def test_long_answer_is_cut_in_pauses(speech):
    gap = np.zeros(int(0.4 * SAMPLE_RATE), np.float32)
    wave = np.concatenate([speech[i % 2] if i % 3 else np.concatenate([speech[i % 2], gap]) for i in range(8)])
    assert len(wave) > 40 * SAMPLE_RATE
    p = prepare(encode(wave, SAMPLE_RATE), VAD)
    frames = vad.silero(wave)
    assert len(p.chunks) >= 2 and all(c.duration_s <= 30.0 for c in p.chunks)
    for c in p.chunks[1:]:
        assert not frames.speech[int(c.start_s / vad.FRAME_S)], f"cut at {c.start_s:.2f} s falls in speech"
    plain = prepare(encode(wave, SAMPLE_RATE), VAD.model_copy(update={"cut_at_pauses": False}))
    assert [round(c.duration_s, 2) for c in plain.chunks] != [round(c.duration_s, 2) for c in p.chunks]


def test_blocks_carry_the_recurrent_state(speech, monkeypatch):
    wave = np.concatenate([speech[0], speech[1]])
    whole = vad.model().probabilities(wave, threads=1)
    monkeypatch.setattr(vad, "BLOCK_FRAMES", 37)
    assert np.max(np.abs(vad.model().probabilities(wave, threads=1) - whole)) < 1e-5


def test_a_process_that_refuses_thread_changes_is_asked_once(speech, monkeypatch):
    """A vLLM CPU engine in the process swaps torch.set_num_threads for a warning that changes nothing."""
    import torch

    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    wanted = torch.get_num_threads() + 1
    detector = vad._Silero()  # not the process's model: its answer stays the test's
    first = detector.probabilities(speech[0], threads=wanted)
    for _ in range(3):
        assert np.array_equal(detector.probabilities(speech[0], threads=wanted), first)
    assert asked == [wanted]  # once, and no restoring call after it


def test_the_detector_leaves_torchs_seed_and_threads_alone():
    """Training seeds torch and runs many threads in the process that also detects speech in its data."""
    import torch

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    before = torch.get_num_threads()
    vad._model = None  # a fresh load, as in a new process
    vad.silero(np.zeros(SAMPLE_RATE, np.float32), threads=1)
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == before


def test_speechlike_test_audio_is_speech_that_ends_as_a_finished_answer():
    from loadtest.audio import speechlike
    from serve.grading.quality import measure_frames

    for seed in range(10):
        wave = speechlike(6.0, seed=seed)
        q = measure_frames(wave, vad.silero(wave))
        assert q.speech_ratio > 0.8 and not q.ends_in_speech, (seed, q)
