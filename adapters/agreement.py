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


def aspect_agreement(
    predicted: Sequence[dict[str, tuple[float, float]]], human: Sequence[dict[str, float]]
) -> dict[str, dict]:
    """Agreement of each analytic aspect, and how far each aspect's scores follow the other aspects' truths.

    ``predicted``: per answer, aspect -> (soft score, hard score); ``human``:
    per answer, aspect -> human score (an answer may lack some). Returns
    ``{"aspects": {aspect: {"n", "soft": metrics, "hard": metrics}}, "cross_pcc":
    {predicted aspect: {human aspect: PCC}}}`` over the aspects both predicted and
    human-scored on at least two answers (rows), against every aspect human-scored
    on at least two of them (columns: an adapter that scores one aspect is held
    against the others' truths too); each pair over the answers that have both.
    """
    if len(predicted) != len(human):
        raise ValueError(f"{len(predicted)} predictions for {len(human)} human scores")
    names = [
        a
        for a in dict.fromkeys(k for p in predicted for k in p)
        if sum(a in p and a in h for p, h in zip(predicted, human)) >= 2
    ]
    truths = names + [
        b for b in dict.fromkeys(k for h in human for k in h) if b not in names and sum(b in h for h in human) >= 2
    ]
    aspects, cross = {}, {}
    for a in names:
        pairs = [(p[a], h[a]) for p, h in zip(predicted, human) if a in p and a in h]
        truth = [h for _, h in pairs]
        aspects[a] = {
            "n": len(pairs),
            "soft": all_metrics([s for (s, _), _ in pairs], truth),
            "hard": all_metrics([hd for (_, hd), _ in pairs], truth),
        }
        cross[a] = {}
        for b in truths:
            both = [(p[a][0], h[b]) for p, h in zip(predicted, human) if a in p and b in h]
            cross[a][b] = pearson([x for x, _ in both], [y for _, y in both])
    return {"aspects": aspects, "cross_pcc": cross}


def format_aspects(agreement: dict[str, dict]) -> list[str]:
    """Human-readable lines of :func:`aspect_agreement`: each aspect's soft metrics, then the cross-PCC matrix."""
    aspects, cross = agreement["aspects"], agreement["cross_pcc"]
    if not aspects:
        return []
    columns = list(next(iter(cross.values())))
    width = max(12, *(len(a) + 2 for a in columns))
    lines = [f"aspect {a} ({m['n']} answers): " + format_metrics("soft", m["soft"]) for a, m in aspects.items()]
    lines.append("aspect cross PCC (rows: predicted aspect, columns: human scores of):")
    lines.append(" " * (width + 2) + "".join(f"{b:>{width}}" for b in columns))
    for a, row in cross.items():
        lines.append(f"  {a:<{width}}" + "".join(f"{row[b]:>{width}.3f}" for b in columns))
    return lines


def format_metrics(name: str, m: dict[str, float]) -> str:
    """One human-readable line."""
    return (
        f"{name:<5} PCC {m['pcc']:.3f}  Spearman {m['spearman']:.3f}  RMSE {m['rmse']:.3f}  "
        f"within 0.5 {100 * m['within_0_5']:.1f}%  within 1.0 {100 * m['within_1_0']:.1f}%"
    )


#: Fewest answers with an aspect's human scores on which it can be validated.
MIN_VALIDATION_ANSWERS = 30


def aspect_validation(
    human_aspect: Sequence[float],
    machine_aspect: Sequence[float],
    machine_holistic: Sequence[float],
    speakers: Sequence[str | None] | None = None,
    resamples: int = 1000,
    seed: int = 0,
):
    """Whether an aspect's score measures its own aspect: its PCC with its own human scores, and its added value
    over the holistic score in predicting them (Haberman 2008, "When can subscores have value?": a subscore is
    worth reporting when it predicts its own true score better than the total score does). Here, with observed
    scores: the 95 % bootstrap interval (resampling speakers) of PCC(aspect, own human) - PCC(holistic, own
    human). Validated when the own PCC's and the added value's intervals both lie above zero, on at least
    :data:`MIN_VALIDATION_ANSWERS` answers."""
    from serve.grading.calibration import AspectValidation

    h, a, t = (np.asarray(x, dtype=np.float64) for x in (human_aspect, machine_aspect, machine_holistic))
    n = len(h)
    if n < MIN_VALIDATION_ANSWERS:
        return AspectValidation(
            n=n,
            pcc_own=None,
            pcc_holistic=None,
            added_value_ci=None,
            validated=False,
            reason=f"{n} answers with its human scores; {MIN_VALIDATION_ANSWERS} are needed",
        )
    own, hol = pearson(a, h), pearson(t, h)
    keys = [sp if sp is not None else f"#{i}" for i, sp in enumerate(speakers or [None] * n)]
    groups = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    members = list(groups.values())
    rng = np.random.default_rng(seed)
    gains, owns = [], []
    for _ in range(resamples):
        idx = np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])
        o, g = pearson(a[idx], h[idx]), pearson(t[idx], h[idx])
        if np.isfinite(o) and np.isfinite(g):
            owns.append(o)
            gains.append(o - g)
    lo, hi = (float(x) for x in np.percentile(gains, [2.5, 97.5])) if gains else (float("nan"),) * 2
    own_lo = float(np.percentile(owns, 2.5)) if owns else float("nan")
    validated = bool(own_lo > 0 and lo > 0)
    reason = (
        "agrees with its own human scores and adds to the holistic score"
        if validated
        else "no clear agreement with its own human scores"
        if not own_lo > 0
        else "no clear added value over the holistic score (it echoes it)"
    )
    return AspectValidation(
        n=n,
        pcc_own=float(own) if np.isfinite(own) else None,
        pcc_holistic=float(hol) if np.isfinite(hol) else None,
        added_value_ci=(lo, hi) if gains else None,
        validated=validated,
        reason=reason,
    )
