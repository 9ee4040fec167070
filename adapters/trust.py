"""Which scores to trust, measured on a held-out set: selective scoring and fairness across groups.

- **Selective scoring**: route the answers a signal ranks most doubtful to
  human examiners at review rates of 0, 5, 10, 20 and 30 %, and measure PCC,
  RMSE and within-0.5 of the answers kept. A useful signal raises the kept
  answers' agreement as the rate grows; the Spearman correlation between each
  signal and the absolute error says the same in one number.
- **Fairness**: per group of any field of the data (``--group-by l1,gender``),
  n, PCC, RMSE, mean signed error (machine minus human), the standardised mean
  difference and the review rate. The SMD is the difference of the machine
  and human means over the pooled standard deviation
  ``sqrt((sd_machine^2 + sd_human^2) / 2)``; following Williamson, Xi & Breyer
  (2012), "A framework for evaluation and use of automated scoring",
  Educational Measurement: Issues and Practice 31(1), 2-13, a set is flagged
  when |SMD| > 0.15 and a subgroup when |SMD| > 0.10. Each SMD comes with a
  95 % bootstrap interval (answers resampled with their human scores,
  :data:`BOOTSTRAP` times, seeded), and a group is flagged only when the whole
  interval lies beyond the limit: a small group's SMD swings by chance. A
  group of fewer than :data:`MIN_GROUP` answers is listed as too small and
  never flagged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from adapters.agreement import pearson, rmse, spearman, within
from serve.grading.results import ScoredAnswer

REVIEW_RATES = (0.0, 0.05, 0.10, 0.20, 0.30)
#: |SMD| above which the whole set, and a subgroup, is flagged (Williamson, Xi & Breyer 2012).
SMD_LIMIT_OVERALL, SMD_LIMIT_GROUP = 0.15, 0.10
#: Bootstrap resamples of each group's SMD, the interval's level, and the fewest answers a group needs to be judged.
BOOTSTRAP, SMD_CI_LEVEL, MIN_GROUP = 2000, 0.95, 10

#: Signal name -> how doubtful an answer is by it (higher: route to a human first).
SIGNALS: dict[str, Callable[[ScoredAnswer], float]] = {
    "score_sd": lambda a: a.uncertainty.score_sd,
    "entropy": lambda a: a.uncertainty.entropy,
    "label_mass": lambda a: -a.uncertainty.label_mass,
    "chunk_spread": lambda a: a.uncertainty.chunk_spread,
    "snr_db": lambda a: -a.quality.snr_db,
    "clipped_fraction": lambda a: a.quality.clipped_fraction,
    "speech_ratio": lambda a: -a.quality.speech_ratio,
}


def _nan_to_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def kept_metrics(pred: np.ndarray, human: np.ndarray) -> dict[str, float | None]:
    """PCC, RMSE and within-0.5 of the answers kept (PCC None when undefined)."""
    if len(pred) == 0:
        return {"pcc": None, "rmse": None, "within_0_5": None}
    return {
        "pcc": _nan_to_none(pearson(pred, human) if len(pred) > 1 else float("nan")),
        "rmse": rmse(pred, human),
        "within_0_5": within(pred, human, 0.5),
    }


def selective(
    pred: Sequence[float], human: Sequence[float], doubt: Sequence[float], rates: Sequence[float] = REVIEW_RATES
) -> list[dict]:
    """For each review rate, the agreement of the answers kept once the most doubtful share is routed away."""
    p, h, d = (np.asarray(x, dtype=np.float64) for x in (pred, human, doubt))
    order = np.argsort(-d, kind="stable")  # most doubtful first
    rows = []
    for rate in rates:
        n_routed = int(round(rate * len(p)))
        keep = np.sort(order[n_routed:])
        rows.append({"review_rate": rate, "n_kept": int(len(keep)), **kept_metrics(p[keep], h[keep])})
    return rows


def verdict_point(pred: Sequence[float], human: Sequence[float], needed: Sequence[bool]) -> dict:
    """The review verdict as one operating point: its review rate and the agreement of the answers it keeps."""
    p, h, n = np.asarray(pred, float), np.asarray(human, float), np.asarray(needed, bool)
    return {"review_rate": float(n.mean()), "n_kept": int((~n).sum()), **kept_metrics(p[~n], h[~n])}


def error_spearman(pred: Sequence[float], human: Sequence[float], doubt: Sequence[float]) -> float | None:
    """Spearman correlation between a signal (oriented: higher = more doubtful) and the absolute error."""
    err = np.abs(np.asarray(pred, float) - np.asarray(human, float))
    d = np.asarray(doubt, float)
    if np.ptp(d) == 0 or np.ptp(err) == 0:
        return None
    return _nan_to_none(spearman(d, err))


def smd(pred: Sequence[float], human: Sequence[float]) -> float | None:
    """Standardised mean difference, machine minus human, over the pooled SD (None when both are constant)."""
    p, h = np.asarray(pred, float), np.asarray(human, float)
    sd = math.sqrt((p.var(ddof=1) + h.var(ddof=1)) / 2) if len(p) > 1 else 0.0
    return None if sd == 0 else float((p.mean() - h.mean()) / sd)


def smd_interval(
    pred: Sequence[float], human: Sequence[float], n_boot: int = BOOTSTRAP, level: float = SMD_CI_LEVEL, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of :func:`smd` (answers resampled in pairs); None when undefined."""
    p, h = np.asarray(pred, float), np.asarray(human, float)
    if len(p) < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, len(p), size=(n_boot, len(p)))
    bp, bh = p[idx], h[idx]
    sd = np.sqrt((bp.var(axis=1, ddof=1) + bh.var(axis=1, ddof=1)) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (bp.mean(axis=1) - bh.mean(axis=1)) / sd
    d = d[np.isfinite(d)]
    if d.size < n_boot // 2:
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(d, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Row:
    """One evaluated answer: machine and human score, its review verdict and its group fields."""

    pred: float
    human: float
    review: bool
    fields: Mapping[str, object]


def group_of(fields: Mapping[str, object], field: str) -> str:
    """The group an answer is in by ``field`` ("(none)" when the data leaves it out or null)."""
    value = fields.get(field)
    return "(none)" if value is None else str(value)


def group_table(rows: Sequence[Row], group_by: Sequence[str]) -> list[dict]:
    """The fairness table: the whole set, then every group of every field in ``group_by``."""

    def stats(field: str, group: str, members: Sequence[Row], limit: float) -> dict:
        p = np.array([r.pred for r in members])
        h = np.array([r.human for r in members])
        d = smd(p, h)
        too_small = len(members) < MIN_GROUP
        ci = None if too_small else smd_interval(p, h)
        return {
            "field": field,
            "group": group,
            "n": len(members),
            "pcc": _nan_to_none(pearson(p, h)) if len(members) > 1 else None,
            "rmse": rmse(p, h),
            "mean_error": float((p - h).mean()),
            "smd": d,
            "review_rate": float(np.mean([r.review for r in members])),
            "smd_limit": limit,
            "smd_ci": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
            "too_small": too_small,
            "flagged": ci is not None and (ci[0] > limit or ci[1] < -limit),
        }

    table = [stats("all", "all", rows, SMD_LIMIT_OVERALL)]
    for field in group_by:
        for value in sorted({group_of(r.fields, field) for r in rows}):
            members = [r for r in rows if group_of(r.fields, field) == value]
            table.append(stats(field, value, members, SMD_LIMIT_GROUP))
    return table


def trust_report(
    scored: Sequence[ScoredAnswer],
    human: Sequence[float],
    fields: Sequence[Mapping[str, object]],
    group_by: Sequence[str] = (),
    primary: str = "score_sd",
) -> dict:
    """Selective scoring for every signal (``primary``'s list as ``selective``), the verdict's operating point,
    each signal's Spearman with |error|, and the group table."""
    if primary not in SIGNALS:
        raise ValueError(f"unknown signal {primary!r} (signals: {', '.join(SIGNALS)})")
    pred = [a.score for a in scored]
    by_signal, rho = {}, {}
    for name, signal in SIGNALS.items():
        doubt = [signal(a) for a in scored]
        by_signal[name] = selective(pred, human, doubt)
        rho[name] = error_spearman(pred, human, doubt)
    needed = [a.review.needed for a in scored]
    rows = [Row(p, h, n, f) for p, h, n, f in zip(pred, human, needed, fields)]
    reasons: dict[str, int] = {}
    for a in scored:
        for r in a.review.reasons:
            reasons[r] = reasons.get(r, 0) + 1
    return {
        "selective_signal": primary,
        "selective": [
            {k: x[k] for k in ("review_rate", "pcc", "rmse", "within_0_5", "n_kept")} for x in by_signal[primary]
        ],
        "selective_by_signal": by_signal,
        "review_verdict": {**verdict_point(pred, human, needed), "reasons": reasons},
        "error_spearman": rho,
        "groups": group_table(rows, group_by),
    }
