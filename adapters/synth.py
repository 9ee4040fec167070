"""A synthetic speaking test whose "proficiency" is a known function of how each answer sounds.

No real learner data can be shipped, so training is proven on speech made
locally with espeak-ng. Each answer draws a latent proficiency ``s`` in
[1, 6] (the human score written to the data) and speaks a short sentence so
that fluency is audible:

- speaking rate ``90 + 38 * (s - 1)`` words per minute (90 to 280),
- a pause of ``400 * (6 - s) / 5`` ms between words (0 to 400 ms),
- ``round(3 * (6 - s) / 5)`` hesitations ("uh", "um") with pauses around them.

Voice, pitch and sentence vary at random and carry no information about the
score. Answers last about 2-6 s (drawn independently of the score, so length
is no cue) and a CPU trains on them quickly. The score
is continuous, so the data exercises the fair-average targets.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SCORE_MIN, SCORE_MAX = 1.0, 6.0
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f2", "en-gb+f3", "en-us+m3")
HESITATIONS = ("uh", "um", "er")
SENTENCES = (
    "I live in a small town near the sea",
    "My favourite food is rice with vegetables",
    "I usually go to work by bus",
    "At the weekend I play football with friends",
    "I have two brothers and one sister",
    "I like reading books in the evening",
    "My job is quite interesting but busy",
    "I want to visit Japan next year",
    "We often cook dinner together at home",
    "The weather here is cold in winter",
    "I started learning English at school",
    "My best friend lives in another city",
    "I enjoy walking in the park on Sunday",
    "Last summer we went to the mountains",
    "I think music helps me relax",
    "Our house has a garden with flowers",
)


class SynthError(RuntimeError):
    """espeak-ng is missing or failed."""


@dataclass(frozen=True)
class Spec:
    """How one synthetic answer is spoken."""

    score: float
    rate_wpm: int
    pause_ms: int
    hesitations: int
    voice: str
    pitch: int
    text: str


def rate_wpm(score: float) -> int:
    return int(round(90 + 38 * (score - SCORE_MIN)))


def pause_ms(score: float) -> int:
    return int(round(400 * (SCORE_MAX - score) / (SCORE_MAX - SCORE_MIN)))


def n_hesitations(score: float) -> int:
    return int(round(3 * (SCORE_MAX - score) / (SCORE_MAX - SCORE_MIN)))


def estimated_duration_s(n_words: int, score: float) -> float:
    """Rough length of an answer of ``n_words`` words at ``score`` (used to keep answers 2-6 s long)."""
    hes = n_hesitations(score)
    return (n_words + hes) * 60.0 / rate_wpm(score) + (n_words + hes - 1) * pause_ms(score) / 1000.0 + 0.2


def make_spec(score: float, rng: random.Random) -> Spec:
    """Speaking parameters for a score; the words, length, voice and pitch are drawn from ``rng``.

    The answer's length is drawn independently of the score (about 2-6 s), so
    duration alone says nothing about the score: rate and pauses do.
    """
    sentences = list(SENTENCES)
    rng.shuffle(sentences)
    stream = " ".join(sentences).split()
    target = rng.uniform(2.0, 6.0)
    # at least ~1.5 s of speech, so that every answer passes serving's speech check
    min_words = next(n for n in range(2, 40) if n * 60.0 / rate_wpm(score) >= 1.5)
    n_words = min(range(min_words, 40), key=lambda n: abs(estimated_duration_s(n, score) - target))
    words = stream[:n_words]
    hes = n_hesitations(score)
    for _ in range(hes):
        words.insert(rng.randint(1, len(words) - 1), rng.choice(HESITATIONS))
    gap = pause_ms(score)
    sep = f' <break time="{gap}ms"/> ' if gap > 0 else " "
    text = sep.join(words)
    return Spec(round(score, 3), rate_wpm(score), gap, hes, rng.choice(VOICES), rng.randint(30, 70), text)


def speak(spec: Spec) -> np.ndarray:
    """Synthesize one answer: float32 mono at 16 kHz."""
    from serve.grading.audio import decode

    cmd = ["espeak-ng", "-m", "-v", spec.voice, "-s", str(spec.rate_wpm), "-p", str(spec.pitch), "--stdout", spec.text]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise SynthError(f"espeak-ng failed: {e}") from None
    return decode(out)


def _scores(n: int, rng: random.Random) -> list[float]:
    """``n`` scores spread evenly over [1, 6] (stratified), in random order."""
    scores = [SCORE_MIN + (SCORE_MAX - SCORE_MIN) * (i + rng.random()) / n for i in range(n)]
    rng.shuffle(scores)
    return scores


def synth_dataset(
    out_dir: str | Path,
    *,
    n_train: int = 300,
    n_dev: int = 60,
    n_test: int = 100,
    seed: int = 0,
    part: str = "interview",
    workers: int = 2,
) -> dict[str, Path]:
    """Write ``audio/<split>/*.wav`` and ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` under ``out_dir``."""
    import soundfile as sf

    from serve.grading.audio import SAMPLE_RATE

    if shutil.which("espeak-ng") is None:
        raise SynthError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    out = Path(out_dir)
    rng = random.Random(seed)
    jobs = []
    for split_name, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        (out / "audio" / split_name).mkdir(parents=True, exist_ok=True)
        for i, score in enumerate(_scores(n, rng)):
            speaker = f"{split_name}-{i:04d}"
            jobs.append((split_name, speaker, Path("audio") / split_name / f"{speaker}.wav", make_spec(score, rng)))

    def render(job):
        _, _, rel, spec = job
        sf.write(out / rel, speak(spec), SAMPLE_RATE, subtype="PCM_16")
        return job

    rows: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for split_name, speaker, rel, spec in pool.map(render, jobs):
            row = {"audio": str(rel), "score": spec.score, "part": part, "speaker": speaker}
            row["synth"] = {k: v for k, v in asdict(spec).items() if k != "score"}
            rows[split_name].append(json.dumps(row))
    paths = {}
    for split_name, lines in rows.items():
        paths[split_name] = out / f"{split_name}.jsonl"
        paths[split_name].write_text("".join(line + "\n" for line in lines))
    return paths
