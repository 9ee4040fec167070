"""Speech detection against a labelled set: Silero VAD and the loudness rule, side by side (``l2grader bench-vad``).

The set is made here: espeak-ng speech (normalised to -20 dBFS over its
voiced frames, with pauses and silence around it) clean, under white and pink
noise at several SNRs, and quiet; and answers without speech at speech
loudness: white and pink noise, mains hum, music-like chords, clicks, plus
digital and near silence. A frame's truth is whether the clean speech under
it is within 35 dB of the speech's level. For each detector and scenario:
frame precision and recall (speech scenarios), the share of non-speech frames
called speech, the share of answers the speech check would refuse (less than
``min_speech_s`` of speech: kind ``silence``), and the CPU milliseconds each
detector spends per second of audio.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np

from serve.grading import quality, vad
from serve.grading.config import AudioConfig

RATE = 16000
SPEECH_DBFS = -20.0


def _level(wave: np.ndarray, dbfs: float) -> np.ndarray:
    """``wave`` scaled so that its RMS is ``dbfs``."""
    rms = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2))) or 1.0
    return (wave * (10 ** (dbfs / 20) / rms)).astype(np.float32)


def _voiced_rms(wave: np.ndarray) -> float:
    p = quality.frame_powers(wave, RATE)
    loud = p[p > p.max() * 10 ** (-35 / 10)]
    return float(np.sqrt(loud.mean()))


def _speech(seed: int) -> np.ndarray:
    """An espeak-ng answer (6-10 s: sentences with pauses, silence around), voiced frames at -20 dBFS."""
    import random

    from adapters.synth import SENTENCES, VOICES, Spec, speak

    rng = random.Random(seed)
    words = " ".join(rng.sample(SENTENCES, 3))
    spec = Spec(
        3.0, 150, 300, 0, rng.choice(VOICES), rng.randint(30, 70), words.replace(" ", ' <break time="250ms"/> ')
    )
    wave = speak(spec)
    pad = np.zeros(int(0.6 * RATE), np.float32)
    wave = np.concatenate([pad, wave, pad])
    return (wave * (10 ** (SPEECH_DBFS / 20) / _voiced_rms(wave))).astype(np.float32)


def white(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.normal(size=n).astype(np.float32)


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f noise (white noise shaped in the frequency domain)."""
    spectrum = np.fft.rfft(rng.normal(size=n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[0] = 0
    return np.fft.irfft(spectrum, n).astype(np.float32)


def hum(n: int, rng: np.random.Generator, mains: float = 50.0) -> np.ndarray:
    """Mains hum: 50 Hz (or ``mains``) and its harmonics."""
    t = np.arange(n) / RATE
    base = mains * (1 + 0.002 * rng.standard_normal())
    return sum(np.sin(2 * np.pi * k * base * t + rng.random() * 6.28) / k for k in (1, 2, 3, 4, 5)).astype(np.float32)


def buzz(n: int, rng: np.random.Generator) -> np.ndarray:
    """A buzz: a sawtooth of 100-200 Hz (a buzzer, an electric razor), every harmonic at 1/k."""
    t = np.arange(n) / RATE
    return (2 * ((rng.uniform(100, 200) * t) % 1.0) - 1).astype(np.float32)


def tones(n: int, rng: np.random.Generator, freqs: tuple[float, ...] = (440.0,)) -> np.ndarray:
    """Steady pure tones (one: a test tone; several: a dial tone, a whistle's partials), random phases."""
    t = np.arange(n) / RATE
    return sum(np.sin(2 * np.pi * f * t + rng.random() * 6.28) for f in freqs).astype(np.float32)


def music(n: int, rng: np.random.Generator) -> np.ndarray:
    """Music-like: chords of three harmonic notes changing every 0.4 s, with note attacks and decays."""
    t = np.arange(n) / RATE
    out = np.zeros(n)
    step = int(0.4 * RATE)
    for start in range(0, n, step):
        root = 220 * 2 ** (rng.integers(0, 12) / 12)
        seg = slice(start, min(n, start + step))
        tt = t[seg] - t[start]
        env = np.exp(-3 * tt) * (1 - np.exp(-80 * tt))
        for ratio in (1.0, 1.26, 1.5):
            out[seg] += env * sum(np.sin(2 * np.pi * ratio * root * k * tt) / k**1.5 for k in (1, 2, 3))
    return out.astype(np.float32)


def clicks(n: int, rng: np.random.Generator) -> np.ndarray:
    """Clicks over silence: a short decaying impulse every 0.1-0.5 s (a handled microphone, a keyboard)."""
    out = np.zeros(n, np.float32)
    click = (np.exp(-np.arange(80) / 10) * rng.choice([-1, 1], 80)).astype(np.float32)
    pos = 0
    while True:
        pos += int(rng.uniform(0.1, 0.5) * RATE)
        if pos + click.size >= n:
            return out
        out[pos : pos + click.size] += 0.5 * click


def scenarios(answers: int = 4, seed: int = 0) -> list[tuple[str, list[tuple[np.ndarray, np.ndarray]]]]:
    """(name, [(audio, clean speech or zeros)]) for every scenario of the set."""
    rng = np.random.default_rng(seed)
    clean = [_speech(seed * 1000 + i) for i in range(answers)]

    def noisy(kind: Callable, snr: float) -> list:
        return [(s + _level(kind(s.size, rng), SPEECH_DBFS - snr), s) for s in clean]

    def alone(kind: Callable, dbfs: float = SPEECH_DBFS) -> list:
        return [(_level(kind(s.size, rng), dbfs), np.zeros_like(s)) for s in clean]

    quiet = [(s * 10 ** (-30 / 20), s * 10 ** (-30 / 20)) for s in clean]  # voiced frames at -50 dBFS
    return [
        ("speech, clean", [(s, s) for s in clean]),
        ("speech, white noise 20 dB", noisy(white, 20)),
        ("speech, white noise 10 dB", noisy(white, 10)),
        ("speech, white noise 5 dB", noisy(white, 5)),
        ("speech, white noise 0 dB", noisy(white, 0)),
        ("speech, pink noise 10 dB", noisy(pink, 10)),
        ("speech, pink noise 0 dB", noisy(pink, 0)),
        ("speech, quiet (-50 dBFS)", quiet),
        ("white noise only", alone(white)),
        ("pink noise only", alone(pink)),
        ("hum only", alone(hum)),
        ("music-like only", alone(music)),
        ("clicks only", [(clicks(s.size, rng), np.zeros_like(s)) for s in clean]),
        ("digital silence", [(np.zeros_like(s), np.zeros_like(s)) for s in clean]),
        ("near silence (-70 dBFS noise)", alone(white, -70.0)),
    ]


def truth(clean: np.ndarray, frame_s: float) -> np.ndarray:
    """Frames where the clean speech is within 35 dB of its voiced level."""
    p = quality.frame_powers(clean, RATE, frame_s)
    if p.max() <= 0:
        return np.zeros(p.size, bool)
    return p > _voiced_rms(clean) ** 2 * 10 ** (-35 / 10)


DETECTORS = {
    "loudness": lambda w, cfg: vad.loudness(w, cfg.silence_dbfs),
    "silero_vad": lambda w, cfg: vad.silero(w, cfg.vad_threshold, cfg.vad_threads),
}


def run(answers: int = 4, seed: int = 0) -> dict:
    """Every detector on every scenario; the table's rows and the CPU cost."""
    cfg = AudioConfig()
    vad.model()  # loaded before timing
    sets = scenarios(answers, seed)
    rows, cpu = [], {}
    for name, det in DETECTORS.items():
        spent = seconds = 0.0
        for scenario, pairs in sets:
            tp = fp = fn = tn = refused = 0
            for audio, clean in pairs:
                t0 = time.process_time()
                frames = det(audio, cfg)
                spent += time.process_time() - t0
                seconds += audio.size / RATE
                want = truth(clean, frames.frame_s)[: frames.speech.size]
                got = frames.speech[: want.size]
                tp += int(np.sum(got & want))
                fp += int(np.sum(got & ~want))
                fn += int(np.sum(~got & want))
                tn += int(np.sum(~got & ~want))
                refused += frames.speech_s < cfg.min_speech_s
            rows.append(
                {
                    "scenario": scenario,
                    "detector": name,
                    "precision": tp / (tp + fp) if tp + fp else None,
                    "recall": tp / (tp + fn) if tp + fn else None,
                    "false_speech": fp / (fp + tn) if fp + tn else None,
                    "refused": refused / len(pairs),
                }
            )
        cpu[name] = 1000 * spent / seconds
    return {"rows": rows, "cpu_ms_per_audio_s": cpu, "answers_per_scenario": answers}


def _f(x: float | None, pct: bool = False) -> str:
    return "-" if x is None else (f"{100 * x:.0f}%" if pct else f"{x:.3f}")


def main(answers: int = 4, seed: int = 0) -> dict:
    """Print the table (and its JSON as the last line)."""
    result = run(answers, seed)
    print(f"{'scenario':<32}{'detector':<12}{'precision':>10}{'recall':>8}{'false speech':>14}{'refused':>9}")
    for r in result["rows"]:
        print(
            f"{r['scenario']:<32}{r['detector']:<12}{_f(r['precision']):>10}{_f(r['recall']):>8}"
            f"{_f(r['false_speech'], True):>14}{_f(r['refused'], True):>9}"
        )
    for name, ms in result["cpu_ms_per_audio_s"].items():
        print(f"CPU per second of audio, {name}: {ms:.2f} ms")
    print(json.dumps(result), flush=True)
    return result


def add_bench_vad_command(sub) -> None:
    """``l2grader bench-vad``."""
    p = sub.add_parser(
        "bench-vad", help="speech detection (Silero VAD and the loudness rule) against a generated labelled set"
    )
    p.add_argument("--answers", type=int, default=4, help="answers per scenario (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda args: main(args.answers, args.seed) and 0)


def long_answers(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` answers of 40-75 s: espeak-ng sentences with pauses of 0.3-1.2 s between them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        target, pieces, total = rng.uniform(40, 75), [], 0.0
        k = 0
        while total < target:
            s = _speech(seed * 7919 + i * 101 + k)
            k += 1
            pause = np.zeros(int(rng.uniform(0.3, 1.2) * RATE), np.float32)
            pieces += [s, pause]
            total += (s.size + pause.size) / RATE
        out.append(np.concatenate(pieces)[: int(target * RATE)])
    return out


def _pause_at(speech: np.ndarray, frame: int) -> int:
    """Frames of the non-speech run holding ``frame`` (0 in speech)."""
    frame = min(speech.size - 1, frame)
    if speech[frame]:
        return 0
    speech_at = np.flatnonzero(speech)
    i = np.searchsorted(speech_at, frame)
    start = speech_at[i - 1] + 1 if i else 0
    end = speech_at[i] if i < speech_at.size else speech.size
    return int(end - start)


def chunk_cuts(config: str, part: str, answers: int = 6, seed: int = 0, engine: bool = True) -> dict:
    """Long answers cut at balanced points and in pauses: the share of cuts that fall in speech (Silero VAD's
    frames) and, scored by the config's engine, the mean spread of the chunk scores (highest minus lowest) and how
    far each answer's score moves between the two cuts (mean and largest absolute difference)."""
    from loadtest.audio import encode
    from serve.grading.audio import prepare
    from serve.grading.config import load_config

    cfg = load_config(config)
    waves = long_answers(answers, seed)
    result = {}
    prepared = {}
    for name, pauses in (("balanced", False), ("pauses", True)):
        audio_cfg = cfg.audio.model_copy(update={"cut_at_pauses": pauses})
        prepared[name] = [prepare(encode(w, RATE), audio_cfg) for w in waves]
        in_speech = cuts = 0
        pause_s = []
        for w, p in zip(waves, prepared[name]):
            frames = vad.silero(w)
            for c in p.chunks[1:]:
                cuts += 1
                pause_s.append(_pause_at(frames.speech, int(c.start_s / frames.frame_s)) * frames.frame_s)
                in_speech += pause_s[-1] == 0
        result[name] = {
            "chunks": sum(len(p.chunks) for p in prepared[name]),
            "cuts": cuts,
            "cuts_in_speech": in_speech,
            "mean_pause_at_cut_s": float(np.mean(pause_s)) if pause_s else None,
        }
    if engine:
        from serve.engine.offline import OfflineEngine

        scorer = OfflineEngine(cfg)
        scores = {}
        try:
            for name, ps in prepared.items():
                scored = scorer.score_answers([(part, p) for p in ps])
                spreads = [s.uncertainty.chunk_spread for s in scored]
                scores[name] = np.array([s.score for s in scored])
                result[name]["mean_chunk_spread"] = float(np.mean(spreads))
                result[name]["max_chunk_spread"] = float(np.max(spreads))
        finally:
            scorer.shutdown()
        shift = np.abs(scores["pauses"] - scores["balanced"])
        result["score_shift"] = {"n": int(shift.size), "mean_abs": float(shift.mean()), "max_abs": float(shift.max())}
    durations = [round(w.size / RATE, 1) for w in waves]
    print(f"{answers} long answers ({min(durations)}-{max(durations)} s)")
    for name, r in result.items():
        if name == "score_shift":
            print(
                f"  score moved by pause cuts: mean |diff| {r['mean_abs']:.3f}, max {r['max_abs']:.3f} (n = {r['n']})"
            )
            continue
        spread = f", chunk spread mean {r['mean_chunk_spread']:.3f} max {r['max_chunk_spread']:.3f}" if engine else ""
        pause = f", mean pause at a cut {r['mean_pause_at_cut_s']:.2f} s" if r["cuts"] else ""
        cut = f"{r['chunks']} chunks, {r['cuts_in_speech']}/{r['cuts']} cuts in speech"
        print(f"  cut at {name:<9}: {cut}{pause}{spread}")
    print(json.dumps(result), flush=True)
    return result


def add_bench_chunks_command(sub) -> None:
    """``l2grader bench-chunks``."""
    p = sub.add_parser("bench-chunks", help="long answers cut at balanced points and in pauses: cuts in speech, spread")
    p.add_argument("--config", required=True, help="grader YAML config (its engine scores the chunks)")
    p.add_argument("--part", required=True)
    p.add_argument("--answers", type=int, default=6, help="long answers (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-engine", action="store_true", help="only where the cuts fall, no scoring")
    p.set_defaults(func=lambda a: chunk_cuts(a.config, a.part, a.answers, a.seed, not a.no_engine) and 0)
