"""Agreement between predicted and human scores, in the terms automated speaking assessment reports.

Correlations: PCC (Pearson), SRC (Spearman) and KRC (Kendall's tau-b), from
:mod:`scipy.stats`. Errors: RMSE and the shares of answers strictly less than
0.5 and 1.0 off the human score (the Speak & Improve Challenge's LESS05 and
LESS1). Levels: each score is put on its nearest level of the scale (and, for
the half-level figures, on its nearest half level); QWK is scikit-learn's
quadratically weighted Cohen's kappa on those, exact and adjacent agreement the
shares on the same level and at most one level apart. Shares are fractions in
[0, 1]. Where a second human score is at hand, :func:`human_baseline` gives the
same figures for human against human and the machine's drop from them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

#: The scale's level scores when a caller names none (1 = A1 ... 6 = C2).
DEFAULT_LEVEL_SCORES = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
METRIC_KEYS = (
    "pcc",
    "spearman",
    "kendall",
    "rmse",
    "within_0_5",
    "within_1_0",
    "qwk",
    "qwk_half",
    "exact",
    "adjacent",
)
#: The metrics where lower is better (the drop from the human-human figure is the other way round).
LOWER_IS_BETTER = ("rmse",)
#: The data field holding an answer's second, independent human score.
SECOND_HUMAN = "human2"


def _pair(pred: Sequence[float], human: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    h = np.asarray(human, dtype=np.float64).reshape(-1)
    if p.shape != h.shape:
        raise ValueError(f"{len(p)} predictions for {len(h)} human scores")
    if len(p) == 0:
        raise ValueError("no scores to compare")
    return p, h


def _correlation(fn, p: np.ndarray, h: np.ndarray) -> float:
    if len(p) < 2 or np.ptp(p) == 0 or np.ptp(h) == 0:
        return float("nan")  # undefined: a constant side
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(p, h)[0])


def pearson(pred: Sequence[float], human: Sequence[float]) -> float:
    """Pearson correlation (PCC); NaN when either side is constant (correlation undefined)."""
    from scipy.stats import pearsonr

    return _correlation(pearsonr, *_pair(pred, human))


def spearman(pred: Sequence[float], human: Sequence[float]) -> float:
    """Spearman's rank correlation (SRC; ties get their average rank)."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, *_pair(pred, human))


def kendall(pred: Sequence[float], human: Sequence[float]) -> float:
    """Kendall's rank correlation (KRC), tau-b (corrected for ties)."""
    from scipy.stats import kendalltau

    return _correlation(kendalltau, *_pair(pred, human))


def rmse(pred: Sequence[float], human: Sequence[float]) -> float:
    """Root mean squared error."""
    p, h = _pair(pred, human)
    return float(np.sqrt(np.mean((p - h) ** 2)))


def within(pred: Sequence[float], human: Sequence[float], tolerance: float) -> float:
    """Share of predictions strictly less than ``tolerance`` from the human score (LESS05, LESS1)."""
    p, h = _pair(pred, human)
    return float(np.mean(np.abs(p - h) < tolerance - 1e-9))


def level_index(scores: Sequence[float], level_scores: Sequence[float] = DEFAULT_LEVEL_SCORES) -> np.ndarray:
    """Each score's nearest level, as its index on the scale (halfway between two: the higher, as rounding half up)."""
    lv = np.sort(np.asarray(level_scores, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    return np.argmin(np.abs(s - lv[None, :]) - 1e-9 * (s <= lv[None, :]), axis=1)


def half_level_index(scores: Sequence[float], level_scores: Sequence[float] = DEFAULT_LEVEL_SCORES) -> np.ndarray:
    """Each score's nearest half level (levels and the midpoints between them), as its index."""
    lv = np.sort(np.asarray(level_scores, dtype=np.float64))
    halves = np.sort(np.concatenate([lv, (lv[:-1] + lv[1:]) / 2]))
    return level_index(scores, halves)


def qwk(pred_index: Sequence[int], human_index: Sequence[int], n_categories: int) -> float:
    """Quadratically weighted Cohen's kappa of two ratings on ``n_categories`` ordered categories (NaN when both
    raters put every answer in one category)."""
    from sklearn.metrics import cohen_kappa_score

    p, h = np.asarray(pred_index, int), np.asarray(human_index, int)
    if len(set(p.tolist()) | set(h.tolist())) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(cohen_kappa_score(h, p, weights="quadratic", labels=list(range(n_categories))))


def level_agreement(
    pred: Sequence[float], human: Sequence[float], level_scores: Sequence[float] = DEFAULT_LEVEL_SCORES
) -> dict[str, float]:
    """QWK on levels and on half levels, and the shares of answers on the same level and at most one apart."""
    p, h = _pair(pred, human)
    pi, hi = level_index(p, level_scores), level_index(h, level_scores)
    n = len(level_scores)
    return {
        "qwk": qwk(pi, hi, n),
        "qwk_half": qwk(half_level_index(p, level_scores), half_level_index(h, level_scores), 2 * n - 1),
        "exact": float(np.mean(pi == hi)),
        "adjacent": float(np.mean(np.abs(pi - hi) <= 1)),
    }


def all_metrics(
    pred: Sequence[float], human: Sequence[float], level_scores: Sequence[float] = DEFAULT_LEVEL_SCORES
) -> dict[str, float]:
    """Every metric, keyed as in :data:`METRIC_KEYS`."""
    m = {
        "pcc": pearson(pred, human),
        "spearman": spearman(pred, human),
        "kendall": kendall(pred, human),
        "rmse": rmse(pred, human),
        "within_0_5": within(pred, human, 0.5),
        "within_1_0": within(pred, human, 1.0),
        **level_agreement(pred, human, level_scores),
    }
    return {k: m[k] for k in METRIC_KEYS}


def human_baseline(
    pred: Sequence[float],
    human: Sequence[float],
    human2: Sequence[float | None],
    level_scores: Sequence[float] = DEFAULT_LEVEL_SCORES,
) -> dict | None:
    """On the answers with a second human score: every metric of human 2 against human 1, of the machine against
    human 1, and the machine's drop (human-human minus machine-human; for RMSE, machine minus human-human: positive
    is always worse). None when fewer than two answers have a second score."""
    have = [i for i, x in enumerate(human2) if x is not None]
    if len(have) < 2:
        return None
    h = [float(human[i]) for i in have]
    hh = all_metrics([float(human2[i]) for i in have], h, level_scores)
    mh = all_metrics([float(pred[i]) for i in have], h, level_scores)
    drop = {k: (mh[k] - hh[k]) if k in LOWER_IS_BETTER else (hh[k] - mh[k]) for k in METRIC_KEYS}
    return {"n": len(have), "human_human": hh, "machine_human": mh, "drop": drop}


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
        f"{name:<5} PCC {m['pcc']:.3f}  SRC {m['spearman']:.3f}  KRC {m['kendall']:.3f}  RMSE {m['rmse']:.3f}  "
        f"within 0.5 {100 * m['within_0_5']:.1f}%  within 1.0 {100 * m['within_1_0']:.1f}%  QWK {m['qwk']:.3f}  "
        f"QWK half-levels {m['qwk_half']:.3f}  exact {100 * m['exact']:.1f}%  adjacent {100 * m['adjacent']:.1f}%"
    )


def format_baseline(b: dict | None) -> list[str]:
    """Human-readable lines of :func:`human_baseline` (none without a second human score)."""
    if b is None:
        return []
    return [
        f"second human score on {b['n']} answers:",
        "  " + format_metrics("h-h", b["human_human"]),
        "  " + format_metrics("m-h", b["machine_human"]),
        "  machine's drop from human-human: "
        + "  ".join(f"{k} {b['drop'][k]:+.3f}" for k in ("pcc", "qwk", "exact", "adjacent", "rmse")),
    ]


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
