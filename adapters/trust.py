"""Which scores to trust, measured on a held-out set: selective scoring.

- **Selective scoring**: route the answers a signal ranks most doubtful to
  human examiners at review rates of 0, 5, 10, 20 and 30 %, and measure PCC,
  RMSE and within-0.5 of the answers kept. A useful signal raises the kept
  answers' agreement as the rate grows; the Spearman correlation between each
  signal and the absolute error says the same in one number.
- **The review verdict** as its own operating point.

Fairness across groups is :mod:`adapters.fairness`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from adapters.agreement import pearson, rmse, spearman, within
from serve.grading.results import ScoredAnswer

REVIEW_RATES = (0.0, 0.05, 0.10, 0.20, 0.30)

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


def trust_report(scored: Sequence[ScoredAnswer], human: Sequence[float], primary: str = "score_sd") -> dict:
    """Selective scoring for every signal (``primary``'s list as ``selective``), the verdict's operating point and
    each signal's Spearman with |error|."""
    if primary not in SIGNALS:
        raise ValueError(f"unknown signal {primary!r} (signals: {', '.join(SIGNALS)})")
    pred = [a.score for a in scored]
    by_signal, rho = {}, {}
    for name, signal in SIGNALS.items():
        doubt = [signal(a) for a in scored]
        by_signal[name] = selective(pred, human, doubt)
        rho[name] = error_spearman(pred, human, doubt)
    needed = [a.review.needed for a in scored]
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
    }
