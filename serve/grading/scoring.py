"""Soft and hard scores from label log-probabilities, and their aggregation over chunks.

Pure arithmetic, no engine: the vLLM path and the transformers reference both
feed their label log-probabilities through these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serve.grading.calibration import Intervals
from serve.grading.levels import Level, nearest_level
from serve.grading.results import AspectScore, ChunkResult, ModelInfo, ScoredAnswer, Uncertainty


def label_distribution(label_logprobs: Sequence[float]) -> tuple[np.ndarray, float]:
    """The labels' probabilities renormalised over the label set, and the label mass.

    ``label_logprobs`` are the labels' log-probabilities over the whole
    vocabulary; the mass is the total probability they hold (1 when they were
    already normalised over the labels).
    """
    lp = np.asarray(label_logprobs, dtype=np.float64)
    if not np.any(np.isfinite(lp)):
        raise ValueError("no label has a finite log-probability")
    top = lp.max()
    p = np.exp(lp - top)
    total = p.sum()
    return p / total, float(min(1.0, np.exp(top) * total))


@dataclass(frozen=True)
class ChunkScore:
    """Label distribution of one chunk."""

    start_s: float
    end_s: float
    probabilities: np.ndarray  # over the part's levels, in level order
    label_mass: float = 1.0  # probability on the label set before renormalising

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def soft_score(levels: Sequence[Level], probabilities: np.ndarray) -> float:
    """Probability-weighted mean of the level scores."""
    return float(np.dot(probabilities, [lv.score for lv in levels]))


def score_sd(levels: Sequence[Level], probabilities: np.ndarray) -> float:
    """Standard deviation of the level score under the distribution."""
    scores = np.array([lv.score for lv in levels], dtype=np.float64)
    mean = float(np.dot(probabilities, scores))
    return float(np.sqrt(max(0.0, float(np.dot(probabilities, (scores - mean) ** 2)))))


def normalised_entropy(probabilities: np.ndarray) -> float:
    """Entropy of a distribution over K labels divided by log K: 0 for certainty, 1 for uniform."""
    p = np.asarray(probabilities, dtype=np.float64)
    nz = p[p > 0]
    return float(min(1.0, max(0.0, -np.sum(nz * np.log(nz)) / np.log(len(p)))))


@dataclass(frozen=True)
class Combined:
    """An answer's chunk distributions combined: its distribution, soft score, chunk scores and uncertainty."""

    probabilities: np.ndarray
    score: float
    chunk_scores: list[float]
    uncertainty: Uncertainty


def combine(levels: Sequence[Level], chunks: Sequence[ChunkScore]) -> Combined:
    """The duration-weighted mean of the chunks' distributions (its soft score therefore equals the
    duration-weighted mean of the chunk soft scores), with its uncertainty: score SD and entropy of that
    distribution, label mass weighted like the scores, spread of the chunk scores."""
    if not chunks:
        raise ValueError("an answer needs at least one chunk")
    weights = np.array([c.duration_s for c in chunks], dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    probs = np.average(np.stack([c.probabilities for c in chunks]), axis=0, weights=weights)
    probs = probs / probs.sum()
    chunk_scores = [soft_score(levels, c.probabilities) for c in chunks]
    mass = float(np.average([c.label_mass for c in chunks], weights=weights))
    uncertainty = Uncertainty(
        score_sd=score_sd(levels, probs),
        entropy=normalised_entropy(probs),
        label_mass=mass,
        chunk_spread=float(max(chunk_scores) - min(chunk_scores)),
    )
    return Combined(probs, soft_score(levels, probs), chunk_scores, uncertainty)


def _distribution_fields(levels: Sequence[Level], c: Combined, intervals: Intervals | None) -> dict:
    """What a holistic and an aspect score both say of a combined distribution, with its calibrated interval
    (``intervals``; none given: uncalibrated)."""
    interval, interval_status = (intervals or Intervals()).of(c.score, c.uncertainty.score_sd)
    return dict(
        interval=interval,
        interval_status=interval_status,
        score=c.score,
        hard_score=levels[int(np.argmax(c.probabilities))].score,
        cefr=nearest_level(levels, c.score).cefr,
        probabilities={lv.label: float(p) for lv, p in zip(levels, c.probabilities)},
        label_cefr={lv.label: lv.cefr for lv in levels},
        label_mass=c.uncertainty.label_mass,
        uncertainty=c.uncertainty,
    )


def aggregate(
    part: str,
    levels: Sequence[Level],
    chunks: Sequence[ChunkScore],
    model: ModelInfo,
    intervals: Intervals | None = None,
) -> ScoredAnswer:
    """Combine chunk distributions into the answer's score (:func:`combine`).

    The hard score is the most probable label of the combined distribution; the calibrated interval comes from
    ``intervals`` (the part's; none given: uncalibrated).
    """
    c = combine(levels, chunks)
    return ScoredAnswer(
        part=part,
        **_distribution_fields(levels, c, intervals),
        chunks=[
            ChunkResult(start_s=round(ch.start_s, 3), end_s=round(ch.end_s, 3), score=s, label_mass=ch.label_mass)
            for ch, s in zip(chunks, c.chunk_scores)
        ],
        duration_s=round(float(chunks[-1].end_s - chunks[0].start_s), 3),
        model=model,
    )


def aspect_score(
    levels: Sequence[Level],
    chunks: Sequence[ChunkScore],
    adapter: str | None,
    intervals: Intervals | None = None,
    validated: bool = False,
) -> AspectScore:
    """One aspect's chunk distributions combined like the holistic score's (:func:`combine`), with its interval
    (from its own calibration) and whether it is validated."""
    return AspectScore(
        **_distribution_fields(levels, combine(levels, chunks), intervals), adapter=adapter, validated=validated
    )
