"""Agreement between predicted and human scores, as reported in this field.

PCC (Pearson), Spearman's rank correlation, RMSE, and the share of answers
within 0.5 and within 1.0 of the human score (the Speak & Improve Challenge's
measures). Shares are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRIC_KEYS = ("pcc", "spearman", "rmse", "within_0_5", "within_1_0")


def _pair(pred: Sequence[float], human: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    h = np.asarray(human, dtype=np.float64).reshape(-1)
    if p.shape != h.shape:
        raise ValueError(f"{len(p)} predictions for {len(h)} human scores")
    if len(p) == 0:
        raise ValueError("no scores to compare")
    return p, h


def pearson(pred: Sequence[float], human: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant (correlation undefined)."""
    p, h = _pair(pred, human)
    pc, hc = p - p.mean(), h - h.mean()
    denom = np.sqrt((pc**2).sum() * (hc**2).sum())
    return float((pc * hc).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)  # ties get their average rank


def spearman(pred: Sequence[float], human: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson on average ranks)."""
    p, h = _pair(pred, human)
    return pearson(_ranks(p), _ranks(h))


def rmse(pred: Sequence[float], human: Sequence[float]) -> float:
    """Root mean squared error."""
    p, h = _pair(pred, human)
    return float(np.sqrt(np.mean((p - h) ** 2)))


def within(pred: Sequence[float], human: Sequence[float], tolerance: float) -> float:
    """Share of predictions at most ``tolerance`` from the human score."""
    p, h = _pair(pred, human)
    return float(np.mean(np.abs(p - h) <= tolerance + 1e-9))


def all_metrics(pred: Sequence[float], human: Sequence[float]) -> dict[str, float]:
    """Every metric, keyed as in :data:`METRIC_KEYS`."""
    return {
        "pcc": pearson(pred, human),
        "spearman": spearman(pred, human),
        "rmse": rmse(pred, human),
        "within_0_5": within(pred, human, 0.5),
        "within_1_0": within(pred, human, 1.0),
    }


def soft_hard_metrics(answers: Sequence, scored: Sequence) -> dict[str, dict[str, float]]:
    """Every metric of the soft and of the hard scores of scored answers against their human scores.

    ``answers`` are :class:`adapters.dataset.Answer` (their human score), ``scored``
    the :class:`serve.grading.results.ScoredAnswer` of each, in the same order.
    """
    human = [a.example.score for a in answers]
    return {
        "soft": all_metrics([s.score for s in scored], human),
        "hard": all_metrics([s.hard_score for s in scored], human),
    }


def format_metrics(name: str, m: dict[str, float]) -> str:
    """One human-readable line."""
    return (
        f"{name:<5} PCC {m['pcc']:.3f}  Spearman {m['spearman']:.3f}  RMSE {m['rmse']:.3f}  "
        f"within 0.5 {100 * m['within_0_5']:.1f}%  within 1.0 {100 * m['within_1_0']:.1f}%"
    )
