"""Soft and hard scores from label log-probabilities, and their aggregation over chunks.

Pure arithmetic, no engine: the vLLM path and the transformers reference both
feed their label log-probabilities through these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serve.grading.levels import Level, nearest_level
from serve.grading.results import ChunkResult, ModelInfo, ScoredAnswer


def label_probabilities(label_logprobs: Sequence[float]) -> np.ndarray:
    """Renormalise log-probabilities of the labels over the label set (log-sum-exp)."""
    lp = np.asarray(label_logprobs, dtype=np.float64)
    if not np.all(np.isfinite(lp)) and not np.any(np.isfinite(lp)):
        raise ValueError("no label has a finite log-probability")
    lp = lp - lp.max()
    p = np.exp(lp)
    return p / p.sum()


@dataclass(frozen=True)
class ChunkScore:
    """Label distribution of one chunk."""

    start_s: float
    end_s: float
    probabilities: np.ndarray  # over the part's levels, in level order

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def soft_score(levels: Sequence[Level], probabilities: np.ndarray) -> float:
    """Probability-weighted mean of the level scores."""
    return float(np.dot(probabilities, [lv.score for lv in levels]))


def aggregate(part: str, levels: Sequence[Level], chunks: Sequence[ChunkScore], model: ModelInfo) -> ScoredAnswer:
    """Combine chunk distributions into the answer's score.

    The answer's distribution is the duration-weighted mean of the chunks';
    its soft score therefore equals the duration-weighted mean of the chunk
    soft scores. The hard score is the most probable label of that mean.
    """
    if not chunks:
        raise ValueError("an answer needs at least one chunk")
    weights = np.array([c.duration_s for c in chunks], dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    probs = np.average(np.stack([c.probabilities for c in chunks]), axis=0, weights=weights)
    probs = probs / probs.sum()
    score = soft_score(levels, probs)
    return ScoredAnswer(
        part=part,
        score=score,
        hard_score=levels[int(np.argmax(probs))].score,
        cefr=nearest_level(levels, score).cefr,
        probabilities={lv.label: float(p) for lv, p in zip(levels, probs)},
        chunks=[
            ChunkResult(start_s=round(c.start_s, 3), end_s=round(c.end_s, 3), score=soft_score(levels, c.probabilities))
            for c in chunks
        ],
        duration_s=round(float(chunks[-1].end_s - chunks[0].start_s), 3),
        model=model,
    )


def overall(scores: Sequence[float], levels: Sequence[Level]) -> tuple[float, str]:
    """A candidate's overall score (the mean of the answers' scores) and its CEFR level on ``levels``."""
    if not scores:
        raise ValueError("an overall score needs at least one scored answer")
    mean = float(sum(scores) / len(scores))
    return mean, nearest_level(levels, mean).cefr
