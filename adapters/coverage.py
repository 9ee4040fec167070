"""Interval coverage measured where it fails: overall and per bin, each figure with the range its n allows.

A conformal interval promises its coverage on average over answers like the
calibration ones. It can hold overall and fail for whole kinds of answers: at
A1 and C2 when scores shrink toward the middle, near whole levels when a
model's score_sd is small there. :func:`coverage_rows` measures each method's
intervals at each nominal coverage overall and per bin:

- ``predicted_level`` and ``human_level``: the CEFR level nearest the score, and the human score;
- ``score_sd``: deciles of the answers' score_sd (quintiles under 500 answers);
- ``position``: how far the score lies from the nearest whole level, in levels (near: < 0.15, half-way: > 0.35);
- ``chunks``: 1, 2 or 3+ chunks;
- each group field asked for (``--group-by``).

Each bin's row carries its n and the 5-95 % range of coverage a method that
is exactly nominal would show at that n (binomial): a figure outside it is
flagged. :func:`required_answers` is how many calibration answers a nominal
coverage needs for the coverage realised after calibrating to lie within
0.05 of nominal, 5-95 % of the time (the realised coverage of split
conformal is Beta(k, n + 1 - k), k = ceil((n + 1) c): Vovk 2012;
Angelopoulos & Bates 2021, sec. 3.2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from serve.grading import calibration
from serve.grading.levels import Level

#: Bins with fewer answers are reported but not judged.
MIN_JUDGED = 20
#: A target of issue-level promises: bins of at least this many answers within 0.05 of nominal.
TOLERANCE = 0.05


def allowed_range(n: int, nominal: float) -> tuple[float, float]:
    """5-95 % range of the coverage measured on ``n`` answers when the true coverage is ``nominal``."""
    from scipy.stats import binom

    return float(binom.ppf(0.05, n, nominal) / n), float(binom.ppf(0.95, n, nominal) / n)


def realised_range(n: int, nominal: float) -> tuple[float, float]:
    """5-95 % range of the coverage a split-conformal calibration on ``n`` answers realises (over calibrations)."""
    from scipy.stats import beta

    k = math.ceil((n + 1) * nominal - 1e-9)
    if k > n:
        return 1.0, 1.0
    return float(beta.ppf(0.05, k, n + 1 - k)), float(beta.ppf(0.95, k, n + 1 - k))


def required_answers(nominal: float, tolerance: float = TOLERANCE, limit: int = 100_000) -> int:
    """Fewest calibration answers whose 5-95 % range of realised coverage lies within ``tolerance`` of nominal."""
    lo, hi = 1, limit
    ok = lambda n: (lambda r: r[0] >= nominal - tolerance and r[1] <= nominal + tolerance)(realised_range(n, nominal))  # noqa: E731
    while lo < hi:  # the range narrows as n grows (up to the step of k): bisect, then walk to the first that holds
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    while lo > 1 and ok(lo - 1):
        lo -= 1
    return lo


def _cefr(values: np.ndarray, levels: Sequence[Level]) -> list[str]:
    ordered = sorted(levels, key=lambda lv: lv.score)
    idx = calibration.nearest(values, [lv.score for lv in ordered])
    return [ordered[i].cefr for i in idx]


def bins_of(
    human: np.ndarray,
    score: np.ndarray,
    score_sd: np.ndarray,
    chunks: Sequence[int] | None,
    levels: Sequence[Level],
    groups: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, list[str]]:
    """Each bin kind -> every answer's bin."""
    out = {"predicted_level": _cefr(score, levels), "human_level": _cefr(human, levels)}
    q = 10 if len(score_sd) >= 500 else 5
    cuts = np.quantile(score_sd, np.linspace(0, 1, q + 1)[1:-1])
    dec = np.searchsorted(cuts, score_sd, side="right")
    edges = np.concatenate([[score_sd.min()], cuts, [score_sd.max()]])
    out["score_sd"] = [f"q{d + 1} [{edges[d]:.2f}, {edges[d + 1]:.2f}]" for d in dec]
    scores = sorted(lv.score for lv in levels)
    step = min(b - a for a, b in zip(scores, scores[1:]))
    dist = np.abs(score - np.asarray(scores)[calibration.nearest(score, scores)]) / step
    out["position"] = [
        "near a level (<0.15)" if d < 0.15 else "half-way (>0.35)" if d > 0.35 else "between (0.15-0.35)" for d in dist
    ]
    if chunks:
        out["chunks"] = [str(c) if c < 3 else "3+" for c in chunks]
    for name, values in (groups or {}).items():
        out[f"group:{name}"] = ["(none)" if v is None else str(v) for v in values]
    return out


def coverage_rows(
    low: np.ndarray, high: np.ndarray, human: np.ndarray, nominal: float, bins: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    """Coverage and mean width of intervals overall and per bin, each with n, the allowed range and a flag."""
    hit = (human >= low - 1e-9) & (human <= high + 1e-9)
    width = high - low

    def row(sel: np.ndarray) -> dict[str, Any]:
        n = int(sel.sum())
        cov = float(hit[sel].mean()) if n else None
        rng = allowed_range(n, nominal) if n else (None, None)
        judged = n >= MIN_JUDGED
        return {
            "n": n,
            "coverage": cov,
            "mean_width": float(width[sel].mean()) if n else None,
            "allowed": list(rng),
            "outside": bool(judged and (cov < rng[0] or cov > rng[1])),
            "off_by_more_than_tolerance": bool(n >= 100 and abs(cov - nominal) > TOLERANCE),
        }

    out = {"overall": row(np.ones(len(human), bool)), "bins": []}
    for kind, labels in bins.items():
        lab = np.asarray(labels, dtype=object)
        for b in sorted(set(labels)):
            out["bins"].append({"kind": kind, "bin": b, **row(lab == b)})
    judged = [b for b in out["bins"] if b["n"] >= MIN_JUDGED]
    worst = max(judged, key=lambda b: abs(b["coverage"] - nominal), default=None)
    out["worst_bin"] = None if worst is None else {k: worst[k] for k in ("kind", "bin", "n", "coverage", "allowed")}
    out["bins_outside"] = sum(b["outside"] for b in out["bins"])
    return out


def method_table(
    cal_fit,
    human: Sequence[float],
    bins: Mapping[str, Sequence[str]],
    coverages: Sequence[float] = calibration.REPORT_COVERAGES,
    methods: Sequence[str] = calibration.METHODS,
) -> list[dict[str, Any]]:
    """Every method at every coverage: ``cal_fit(method, c)`` gives each answer's (low, high); one row each."""
    h = np.asarray(human, dtype=np.float64)
    rows = []
    for method in methods:
        for c in coverages:
            low, high = cal_fit(method, c)
            rows.append({"method": method, "nominal": c, **coverage_rows(low, high, h, c, bins)})
    return rows


def cross_fitted(
    human: Sequence[float],
    score: Sequence[float],
    score_sd: Sequence[float],
    level_scores: Sequence[float],
    scale: tuple[float, float],
    folds: int = 10,
    seed: int = 0,
):
    """``(method, c) -> (low, high)`` of every calibration answer, each from a rule fitted on the other folds."""
    h, s, sd = (np.asarray(x, dtype=np.float64) for x in (human, score, score_sd))
    fold = np.random.default_rng(seed).permutation(len(h)) % folds

    def of(method: str, c: float) -> tuple[np.ndarray, np.ndarray]:
        low, high = np.empty(len(h)), np.empty(len(h))
        for k in range(folds):
            tr, te = fold != k, fold == k
            if not te.any():
                continue
            rule = calibration.build_rule(method, c, h[tr], s[tr], sd[tr], level_scores, scale)
            low[te], high[te] = calibration.intervals_of(rule, s[te], sd[te], scale)
        return low, high

    return of


def format_table(rows: Sequence[dict[str, Any]], detail: tuple[str, float] | None = None) -> list[str]:
    """Lines: each method and coverage overall with its worst bin; then every bin of ``detail`` (method, c)."""
    lines = [
        f"  {'method':<10}{'nominal':>8}{'coverage':>10}{'width':>8}  {'worst bin (n, coverage, allowed 5-95 %)':<60}"
        f"{'bins outside':>13}"
    ]
    for r in rows:
        o, w = r["overall"], r["worst_bin"]
        worst = (
            "-"
            if w is None
            else f"{w['kind']}={w['bin']} (n={w['n']}, {100 * w['coverage']:.1f}%, "
            f"{100 * w['allowed'][0]:.0f}-{100 * w['allowed'][1]:.0f}%)"
        )
        lines.append(
            f"  {r['method']:<10}{100 * r['nominal']:>7.0f}%{100 * o['coverage']:>9.1f}%{o['mean_width']:>8.3f}  "
            f"{worst:<60}{r['bins_outside']:>13}"
        )
    if detail is not None:
        row = next((r for r in rows if (r["method"], r["nominal"]) == detail), None)
        if row is not None:
            lines.append(f"  per bin, {detail[0]} at {100 * detail[1]:.0f}% ('!': outside the range its n allows):")
            for b in row["bins"]:
                rng = f"{100 * b['allowed'][0]:.0f}-{100 * b['allowed'][1]:.0f}%" if b["n"] else "-"
                lines.append(
                    f"    {b['kind']:<16}{b['bin'][:28]:<29}n={b['n']:<6}{100 * b['coverage']:>6.1f}% "
                    f"width {b['mean_width']:.3f}  allowed {rng}{'  !' if b['outside'] else ''}"
                )
    return lines
