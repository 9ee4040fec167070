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

With ``aspects=True`` (``l2grader synth-data --aspects``) each answer draws
four analytic aspects as independent latent scores in [1, 6], each audible
through its own property of the speech (:func:`make_aspect_spec`), and the
holistic score is their mean:

- ``fluency``: rate, pauses and hesitations, as above;
- ``pronunciation``: the share of words spoken with a consistent foreign
  accent (in the word's phonemes every vowel becomes an open "a" and the
  fricatives become stops, spoken through espeak-ng's ``[[...]]`` phoneme
  input), 0 to 100 %;
- ``language_use``: the share of words with a grammatical or lexical error
  (a dropped article or preposition, a wrong verb form, a wrong word), 0 to 50 %;
- ``coherence``: how the answer is organised: whole sentences linked by
  connectors ("and", "because", "so", ...) with a sentence-final fall, or
  sentences broken off after a few words, jumping to the next without a link.

Every row names its ``voice`` (a group field for fairness tables). For the
checks of which scores to trust, a share of the held-out answers (dev and
test; training stays clean) can be degraded the ways real recordings go
wrong (:data:`DEGRADATIONS`), and a bias can be planted in one voice's human
scores.
"""

from __future__ import annotations

import functools
import json
import random
import re
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


#: Ways a recording goes wrong, each applied by :func:`degrade`.
DEGRADATIONS = ("noise", "clipping", "gaps", "truncation")


def speech_power(wave: np.ndarray) -> float:
    """Mean square of the non-silent samples (synthesized speech has true silence between words)."""
    voiced = wave[np.abs(wave) > 1e-4]
    return float(np.mean(voiced.astype(np.float64) ** 2)) if voiced.size else 0.0


def add_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White noise at ``snr_db`` below the speech's power, over the whole answer."""
    scale = np.sqrt(speech_power(wave) / 10 ** (snr_db / 10))
    return np.clip(wave + rng.normal(scale=scale, size=wave.size), -1, 1).astype(np.float32)


def clip(wave: np.ndarray, gain: float) -> np.ndarray:
    """The answer amplified by ``gain`` and clipped at full scale (an input level set far too high)."""
    return np.clip(wave * gain, -1, 1).astype(np.float32)


def insert_gaps(wave: np.ndarray, gap_s: float, n_gaps: int, rng: np.random.Generator, rate: int = 16000) -> np.ndarray:
    """``n_gaps`` silences of ``gap_s`` seconds at random points (a candidate who stops talking)."""
    cuts = sorted(rng.integers(1, max(2, wave.size - 1), size=n_gaps))
    gap = np.zeros(int(gap_s * rate), np.float32)
    pieces = [p for a, b in zip([0, *cuts], [*cuts, wave.size]) for p in (wave[a:b], gap)][:-1]
    return np.concatenate(pieces).astype(np.float32)


def truncate(wave: np.ndarray, keep: float, min_s: float = 1.6, rate: int = 16000) -> np.ndarray:
    """The first ``keep`` share of the answer (a recording cut off), at least ``min_s`` seconds."""
    return wave[: max(int(keep * wave.size), int(min_s * rate))]


def degrade(wave: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One of :data:`DEGRADATIONS`, at a strength drawn from ``rng``."""
    if kind == "noise":
        return add_noise(wave, rng.uniform(-5.0, 5.0), rng)
    if kind == "clipping":
        return clip(wave, rng.uniform(6.0, 15.0))
    if kind == "gaps":
        return insert_gaps(wave, rng.uniform(3.0, 6.0), int(rng.integers(1, 3)), rng)
    if kind == "truncation":
        return truncate(wave, rng.uniform(0.3, 0.5))
    raise ValueError(f"unknown degradation {kind!r} (known: {', '.join(DEGRADATIONS)})")


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


#: The analytic aspects of ``--aspects`` data, each audible through its own property of the speech.
ASPECTS = ("fluency", "pronunciation", "language_use", "coherence")
CONNECTORS = ("and", "because", "so", "and then", "but", "also")
#: Word-level errors: function words a learner drops, verb forms a learner gets wrong, words used wrongly.
DROPPABLE = frozenset({"a", "the", "to", "in", "at", "with", "by", "on", "of"})
WRONG_FORMS = {
    "live": "lives",
    "is": "are",
    "go": "goes",
    "play": "plays",
    "have": "has",
    "like": "likes",
    "want": "wants",
    "cook": "cooks",
    "started": "start",
    "lives": "live",
    "enjoy": "enjoys",
    "went": "go",
    "think": "thinks",
    "helps": "help",
    "has": "have",
    "usually": "usual",
    "quite": "quiet",
}
WRONG_WORDS = ("make", "thing", "very", "much", "do", "big", "good", "for")
# a consistent foreign accent: in espeak-ng's phoneme mnemonics every vowel becomes an open "a" and the fricatives
# stops (s, z, sh, f, th -> t, d, t, p, t), so accented words sound different without taking longer
_VOWEL = re.compile(r"aI|aU|eI|oU|OI|i@|e@|U@|[aAeEiIoOuUV@3][:#2-]*")
_CONSONANT_SUBS = str.maketrans(
    {"T": "t", "D": "d", "s": "t", "z": "d", "S": "t", "Z": "d", "f": "p", "w": "v", "v": "b", "h": ""}
)


def aspect_level(score: float, top: float) -> float:
    """How far ``score`` is from the best (0 at 6, ``top`` at 1): the share of errors of an aspect."""
    return top * (SCORE_MAX - score) / (SCORE_MAX - SCORE_MIN)


@functools.lru_cache(maxsize=4096)
def phonemes(word: str, voice: str) -> str:
    """espeak-ng's phoneme mnemonics of one word in ``voice``."""
    cmd = ["espeak-ng", "-q", "-x", "-v", voice, word]
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        raise SynthError(f"espeak-ng failed: {e}") from None


def accented(word: str, voice: str) -> str:
    """The word in espeak-ng's phoneme input (``[[...]]``) with the accent's substitutions."""
    ph = _VOWEL.sub("a", phonemes(word, voice))
    return f"[[{ph.translate(_CONSONANT_SUBS).replace(' ', '')}]]"


def _split(word: str) -> tuple[str, str]:
    """A word and its trailing punctuation (``"sea."`` -> ``("sea", ".")``, ``"the ..."`` -> ``("the", " ...")``)."""
    core = word.split(" ")[0].rstrip(".,?!")
    return core, word[len(core) :]


def with_errors(words: list[str], share: float, rng: random.Random) -> tuple[list[str], int]:
    """``words`` with about ``share`` of them wrong (dropped, a wrong form, a wrong word); and how many."""
    out, n = [], 0
    for w in words:
        if rng.random() >= share:
            out.append(w)
            continue
        n += 1
        core, tail = _split(w)
        if core.lower() in DROPPABLE and not tail:
            continue
        out.append((WRONG_FORMS.get(core.lower()) or rng.choice(WRONG_WORDS)) + tail)
    return (out or words[:1]), n


def organised(sentences: list[str], coherence: float, rng: random.Random) -> tuple[list[str], int]:
    """The answer's words: sentences linked by connectors and ended with a full stop, or (the more so the lower
    ``coherence``) broken off after two to four words and jumping to the next without a link; and how many broke."""
    words, broken = [], 0
    for i, sentence in enumerate(sentences):
        ws = sentence.split()
        if rng.random() < aspect_level(coherence, 0.9):
            broken += 1
            words += ws[: rng.randint(2, 4)]
            words[-1] += " ..."
            continue
        if i > 0 and words and not words[-1].endswith("..."):
            words += rng.choice(CONNECTORS).split()
            ws[0] = ws[0].lower() if ws[0] != "I" else ws[0]
        words += ws
        words[-1] += "."
    return words, broken


def make_aspect_spec(aspects: dict[str, float], rng: random.Random) -> tuple[Spec, dict]:
    """How an answer with these aspect scores is spoken, each aspect through its own property, and what was done
    (the spec's score is the aspects' mean).

    Fluency sets rate, pauses and hesitations as :func:`make_spec` does; the
    answer lasts about 5-10 s (drawn independently of every aspect).
    """
    fluency = aspects["fluency"]
    sentences = list(SENTENCES)
    rng.shuffle(sentences)
    words, broken = organised(sentences, aspects["coherence"], rng)
    words, errors = with_errors(words, aspect_level(aspects["language_use"], 0.5), rng)
    target = rng.uniform(5.0, 10.0)
    # at least ~2.5 s of words, so that every answer passes serving's speech check however short its words
    min_words = next(n for n in range(2, 80) if n * 60.0 / rate_wpm(fluency) >= 2.5)
    n_words = min(range(min_words, 80), key=lambda n: abs(estimated_duration_s(n, fluency) - target))
    words = words[:n_words]
    voice = rng.choice(VOICES)
    accent_share = aspect_level(aspects["pronunciation"], 1.0)
    n_accented = 0
    for i, w in enumerate(words):
        if rng.random() < accent_share:
            core, tail = _split(w)
            words[i] = accented(core, voice) + tail
            n_accented += 1
    hes = n_hesitations(fluency)
    for _ in range(hes):
        words.insert(rng.randint(1, len(words) - 1), rng.choice(HESITATIONS))
    gap = pause_ms(fluency)
    sep = f' <break time="{gap}ms"/> ' if gap > 0 else " "
    holistic = round(float(np.mean([aspects[a] for a in ASPECTS])), 3)
    spec = Spec(holistic, rate_wpm(fluency), gap, hes, voice, rng.randint(30, 70), sep.join(words))
    return spec, {"accented_words": n_accented, "word_errors": errors, "broken_sentences": broken}


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
    degrade_share: float = 0.0,
    bias_voice: str | None = None,
    bias: float = 0.0,
    aspects: bool = False,
) -> dict[str, Path]:
    """Write ``audio/<split>/*.wav`` and ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` under ``out_dir``.

    With ``aspects`` every row has ``aspects``: the four :data:`ASPECTS`'
    scores, drawn independently (each spread evenly over [1, 6]), and its
    ``score`` is their mean (:func:`make_aspect_spec`).

    ``degrade_share`` of the dev and test answers are degraded (one of
    :data:`DEGRADATIONS` each, named in the row's ``degradation``); the dev and
    test human scores of ``bias_voice`` are shifted by ``bias`` (clipped to the
    scale; the row keeps the unbiased ``true_score``).
    """
    import soundfile as sf

    from serve.grading.audio import SAMPLE_RATE

    if shutil.which("espeak-ng") is None:
        raise SynthError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    if not 0.0 <= degrade_share <= 1.0:
        raise SynthError(f"the degraded share must be within [0, 1], got {degrade_share}")
    if bias_voice is not None and bias_voice not in VOICES:
        raise SynthError(f"unknown voice {bias_voice!r} (voices: {', '.join(VOICES)})")
    out = Path(out_dir)
    rng = random.Random(seed)
    # Degradations draw from a stream of their own: the answers themselves (score, voice, text, rate) are the same
    # whatever --degrade asks, so a degraded set is the clean set with some answers degraded.
    degrade_rng = random.Random(f"{seed}:degrade")
    jobs = []
    for split_name, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        (out / "audio" / split_name).mkdir(parents=True, exist_ok=True)
        held_out = split_name != "train"
        if aspects:
            columns = [_scores(n, rng) for _ in ASPECTS]
            draws: list = [{a: round(c[i], 3) for a, c in zip(ASPECTS, columns)} for i in range(n)]
        else:
            draws = _scores(n, rng)
        for i, draw in enumerate(draws):
            speaker = f"{split_name}-{i:04d}"
            spec, done = make_aspect_spec(draw, rng) if aspects else (make_spec(draw, rng), None)
            degraded = held_out and degrade_rng.random() < degrade_share
            kind = degrade_rng.choice(DEGRADATIONS) if degraded else None
            rel = Path("audio") / split_name / f"{speaker}.wav"
            job_seed = degrade_rng.randrange(2**32)
            jobs.append((split_name, speaker, rel, spec, kind, job_seed, draw if aspects else None, done))

    def render(job):
        _, _, rel, spec, kind, job_seed, _, _ = job
        wave = speak(spec)
        if kind is not None:
            wave = degrade(wave, kind, np.random.default_rng(job_seed))
        sf.write(out / rel, wave, SAMPLE_RATE, subtype="PCM_16")
        return job

    rows: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for split_name, speaker, rel, spec, kind, _, drawn, done in pool.map(render, jobs):
            row = {"audio": str(rel), "score": spec.score, "part": part, "speaker": speaker, "voice": spec.voice}
            if drawn is not None:
                row["aspects"] = drawn
            if split_name != "train":
                row["degradation"] = kind
                if bias and spec.voice == bias_voice:
                    row["true_score"] = spec.score
                    row["score"] = round(min(SCORE_MAX, max(SCORE_MIN, spec.score + bias)), 3)
            row["synth"] = {k: v for k, v in asdict(spec).items() if k != "score"} | (done or {})
            rows[split_name].append(json.dumps(row))
    paths = {}
    for split_name, lines in rows.items():
        paths[split_name] = out / f"{split_name}.jsonl"
        paths[split_name].write_text("".join(line + "\n" for line in lines))
    return paths
