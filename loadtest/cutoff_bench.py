"""The cut-off rule against espeak-ng answers kept whole, trimmed at their last word and cut mid-word
(``l2grader bench-cutoff``, or ``python -m loadtest.cutoff_bench``).

Each answer is one of :data:`TEXTS` spoken by espeak-ng at each voice of
:data:`VOICES` and rate of :data:`RATES`, its speech scaled to -20 dBFS
(voiced frames). A pause of 200 ms (SSML ``<break>``) sets the last two words
apart, so that where each begins and ends is known from the signal: a word is
a run of 5 ms windows above ``audio.silence_dbfs`` (-50 dBFS) with no gap of
80 ms or more inside it. Each answer goes through the grader's own audio path
(WAV bytes, :func:`serve.grading.audio.prepare` under the default audio
settings, less the speech check: a cut early in a short answer may leave less
than ``audio.min_speech_s`` of speech, and the rule is measured on it too) as:

- ``whole``: espeak-ng's output, its trailing silence kept;
- ``trimmed``: cut at the last millisecond whose level is above
  ``audio.silence_dbfs`` (a complete answer trimmed right after its last word);
- ``last word 30/50/70 %``: cut that far through the last word;
- ``earlier word 30/50/70 %``: cut that far through the word before it.

Each row gives n, the share flagged ``cut_off`` (``quality.ends_in_speech``)
with its Wilson 95 % interval, and the level of the answer's end against its
speech (:meth:`serve.grading.quality.SpeechFrames.end_db`; median), beside
the share the earlier rule flagged (:func:`last_frame_rule`). The trimmed
answers flagged are listed by their last word.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter
from dataclasses import dataclass

import numpy as np

RATE = 16000
SPEECH_DBFS = -20.0
VOICES = ("en", "en-us", "en-gb-scotland", "en+f3", "en+m3")
RATES = (120, 160, 200)
TEXTS = (
    "I live in a small town near the sea",
    "My favourite food is rice with vegetables",
    "At the weekend I play football with friends",
    "I started learning English at school",
    "I usually go to work by bus",
    "I want to visit Japan next year",
)
CUTS = (0.3, 0.5, 0.7)
#: A word is a run of 5 ms windows above silence with no gap this long inside it (the pause before it is 200 ms).
WORD_GAP_S = 0.08
_WIN = int(0.005 * RATE)


@dataclass(frozen=True)
class Answer:
    """One espeak-ng answer and where its last two words lie (samples)."""

    voice: str
    rate: int
    text: str
    wave: np.ndarray
    earlier: tuple[int, int]
    last: tuple[int, int]


def speak(text: str, voice: str, rate: int) -> np.ndarray:
    """espeak-ng's answer (16 kHz float32), a 200 ms pause before each of its last two words, speech at -20 dBFS."""
    from loadtest.vad_bench import _voiced_rms
    from serve.grading.audio import decode

    words = text.split()
    ssml = " ".join(words[:-2]) + "".join(f' <break time="200ms"/> {w}' for w in words[-2:])
    out = subprocess.run(
        ["espeak-ng", "-m", "-v", voice, "-s", str(rate), "--stdout", ssml], check=True, capture_output=True, timeout=60
    ).stdout
    wave = decode(out)
    return (wave * (10 ** (SPEECH_DBFS / 20) / _voiced_rms(wave))).astype(np.float32)


def _levels(wave: np.ndarray, win: int) -> np.ndarray:
    n = len(wave) // win
    x = wave[: n * win].reshape(n, win).astype(np.float64)
    return 10 * np.log10(np.einsum("ij,ij->i", x, x) / win + 1e-12)


def words(wave: np.ndarray, silence_dbfs: float = -50.0) -> list[tuple[int, int]]:
    """Runs of 5 ms windows above ``silence_dbfs`` with no gap of :data:`WORD_GAP_S` inside (sample ranges)."""
    on = np.flatnonzero(_levels(wave, _WIN) > silence_dbfs)
    gap = int(WORD_GAP_S / 0.005)
    runs, start, prev = [], int(on[0]), int(on[0])
    for i in on[1:].tolist():
        if i - prev > gap:
            runs.append((start, prev + 1))
            start = i
        prev = i
    runs.append((start, prev + 1))
    return [(a * _WIN, b * _WIN) for a, b in runs]


def trimmed_end(wave: np.ndarray, silence_dbfs: float = -50.0) -> int:
    """The end of the last millisecond above ``silence_dbfs`` (samples)."""
    ms = RATE // 1000
    return (int(np.flatnonzero(_levels(wave, ms) > silence_dbfs)[-1]) + 1) * ms


def answers(voices=VOICES, rates=RATES, texts=TEXTS) -> list[Answer]:
    """Every text at every voice and rate."""
    out = []
    for voice in voices:
        for rate in rates:
            for text in texts:
                wave = speak(text, voice, rate)
                *_, earlier, last = words(wave)
                out.append(Answer(voice, rate, text, wave, earlier, last))
    return out


def cases(a: Answer) -> dict[str, np.ndarray]:
    """The answer whole, trimmed and cut mid-word (see the module's docstring)."""
    out = {"whole": a.wave, "trimmed": a.wave[: trimmed_end(a.wave)]}
    for name, (start, end) in (("last word", a.last), ("earlier word", a.earlier)):
        for f in CUTS:
            out[f"{name} {round(100 * f)} %"] = a.wave[: start + int(f * (end - start))]
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def last_frame_rule(frames) -> bool:
    """The earlier rule, for comparison: the detector's last whole frame (32 ms, which may end up to 32 ms before
    the answer does) is speech within 25 dB of the speech frames' mean power."""
    return bool(
        frames.speech.size
        and frames.speech[-1]
        and frames.powers[-1] >= frames.powers[frames.speech].mean() * 10 ** (-25 / 10)
    )


def judge(wave: np.ndarray, audio_cfg) -> tuple[bool, float | None, bool]:
    """Whether the grader's audio path flags the answer ``cut_off``, its end level (dB against its speech), and
    whether :func:`last_frame_rule` would."""
    from loadtest.audio import encode
    from serve.grading import vad
    from serve.grading.audio import decode, prepare

    data = encode(wave, RATE)
    flagged = prepare(data, audio_cfg).quality.ends_in_speech
    decoded = decode(data)
    frames = vad.detect(decoded, audio_cfg)
    return flagged, frames.end_db(decoded), last_frame_rule(frames)


def run(voices=VOICES, rates=RATES, texts=TEXTS, audio_cfg=None) -> dict:
    """The table's rows: per case, n, the flagged count and rate with its interval, the median end level."""
    from serve.grading.config import AudioConfig

    audio_cfg = audio_cfg or AudioConfig(min_speech_s=0.0)
    flagged: dict[str, list[bool]] = {}
    levels: dict[str, list[float]] = {}
    before: dict[str, list[bool]] = {}
    trimmed_flagged: Counter[str] = Counter()
    for a in answers(voices, rates, texts):
        for name, wave in cases(a).items():
            hit, level, old = judge(wave, audio_cfg)
            before.setdefault(name, []).append(old)
            flagged.setdefault(name, []).append(hit)
            levels.setdefault(name, []).append(-120.0 if level is None else level)
            if name == "trimmed" and hit:
                trimmed_flagged[a.text.split()[-1]] += 1
    rows = []
    for name, hits in flagged.items():
        k, n = sum(hits), len(hits)
        lo, hi = wilson(k, n)
        rows.append(
            {
                "case": name,
                "n": n,
                "flagged": k,
                "rate": k / n,
                "wilson95": [lo, hi],
                "median_end_db": float(np.median(levels[name])),
                "last_frame_rule_rate": float(np.mean(before[name])),
            }
        )
    return {
        "rows": rows,
        "cut_off_db": audio_cfg.cut_off_db,
        "voices": list(voices),
        "rates": list(rates),
        "texts": len(texts),
        "trimmed_flagged_by_last_word": dict(trimmed_flagged),
    }


def main(voices=VOICES, rates=RATES, texts=TEXTS) -> dict:
    """Print the table (Markdown, as in docs/trust.md) and its JSON as the last line."""
    result = run(voices, rates, texts)
    print(
        f"audio.cut_off_db = {result['cut_off_db']:g}; {len(voices)} voices x {len(rates)} rates x {len(texts)} texts"
    )
    print("| answer | n | flagged cut_off | rate | Wilson 95 % | median end level | last-frame rule (before) |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for r in result["rows"]:
        lo, hi = r["wilson95"]
        print(
            f"| {r['case']} | {r['n']} | {r['flagged']} | {100 * r['rate']:.1f} % | {100 * lo:.1f}-{100 * hi:.1f} % "
            f"| {r['median_end_db']:.1f} dB | {100 * r['last_frame_rule_rate']:.1f} % |"
        )
    print("trimmed answers flagged, by last word:", result["trimmed_flagged_by_last_word"])
    print(json.dumps(result), flush=True)
    return result


def add_bench_cutoff_command(sub) -> None:
    """``l2grader bench-cutoff``."""
    p = sub.add_parser(
        "bench-cutoff", help="the cut_off rule on espeak-ng answers kept whole, trimmed and cut mid-word"
    )
    p.add_argument("--voices", default=",".join(VOICES), help="espeak-ng voices, comma-separated")
    p.add_argument("--rates", default=",".join(map(str, RATES)), help="words a minute (80-450), comma-separated")
    p.set_defaults(func=_cmd_bench_cutoff)


def _cmd_bench_cutoff(args) -> int:
    from serve.cli.common import fail

    voices = tuple(v.strip() for v in args.voices.split(",") if v.strip())
    try:
        rates = tuple(int(r) for r in args.rates.split(",") if r.strip())
    except ValueError:
        fail(f"--rates {args.rates!r}: whole numbers of words a minute, comma-separated")
    if not voices or not rates or not all(80 <= r <= 450 for r in rates):
        fail("--voices and --rates need at least one each; rates from 80 to 450 words a minute (espeak-ng's range)")
    try:
        main(voices, rates)
    except FileNotFoundError:
        fail("espeak-ng is not installed (apt-get install espeak-ng)", 1)
    except subprocess.CalledProcessError as e:
        said = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        fail(f"espeak-ng failed on voice {e.cmd[e.cmd.index('-v') + 1]!r}: {said[-1] if said else 'no message'}", 1)
    return 0


if __name__ == "__main__":
    main()
