"""Levels from scores by a cut-score table, and how reliably scores near a cut classify (Rudner's method).

A cut-score table lists each level above the lowest with the lowest score at
that level; a score gets the highest level whose cut it reaches. The default
table is the midpoints between the scale's level scores, which gives the level
nearest the score (a score at a midpoint goes to the higher level, as
:func:`serve.grading.levels.nearest_level`).

Rudner's classification accuracy and consistency (Rudner 2001, 2005): each
candidate's true score is taken as normal around the observed score with the
score's standard error ``sd``. At a cut ``c`` with ``p = P(true >= c) =
Phi((score - c) / sd)``:

- accuracy: the probability that the true score falls on the observed side
  of the cut, ``p`` when the score is at or above it, else ``1 - p``;
- consistency: the probability that two independent testings (each drawn
  around the true score the same way) fall on the same side, ``p**2 + (1 - p)**2``.

Over all cuts at once (overall): accuracy is the probability that the true
score lies in the observed level, consistency the sum over levels of the
squared probability of each level. Each is averaged over candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

from serve.grading.levels import Level

_N = NormalDist()


def default_cuts(levels: Sequence[Level]) -> list[tuple[str, float]]:
    """(level, its lowest score) for each level above the lowest: the midpoints between the level scores."""
    ordered = sorted(levels, key=lambda lv: lv.score)
    return [(hi.cefr, (lo.score + hi.score) / 2) for lo, hi in zip(ordered, ordered[1:])]


def lowest_level(levels: Sequence[Level]) -> str:
    return min(levels, key=lambda lv: lv.score).cefr


def level_at(score: float, lowest: str, cuts: Sequence[tuple[str, float]]) -> str:
    """The highest level whose cut ``score`` reaches (``lowest`` below the first cut)."""
    level = lowest
    for cefr, cut in cuts:
        if score >= cut:
            level = cefr
    return level


def sd_of_interval(low: float, high: float, coverage: float) -> float:
    """The standard deviation of a normal whose central ``coverage`` interval is as wide as ``[low, high]``."""
    return (high - low) / (2 * _N.inv_cdf(0.5 + coverage / 2))


def _above(score: float, sd: float, cut: float) -> float:
    """P(true score >= cut) when the true score is normal around ``score`` with ``sd`` (a step when sd is 0)."""
    if sd <= 0:
        return 1.0 if score >= cut else 0.0
    return _N.cdf((score - cut) / sd)


def rudner(scores: Sequence[float], sds: Sequence[float], cuts: Sequence[tuple[str, float]]) -> dict:
    """Classification accuracy and consistency, per cut and overall, averaged over the candidates (module doc).

    ``cuts``: (level, lowest score) ascending, as :func:`default_cuts`. Returns ``{"n", "per_cut": [{"cut",
    "level", "accuracy", "consistency", "near"}], "accuracy", "consistency"}``; ``near`` counts the candidates
    whose score is within one ``sd`` of the cut.
    """
    if len(scores) != len(sds):
        raise ValueError("one sd per score")
    n = len(scores)
    per_cut = []
    for cefr, cut in cuts:
        acc = con = 0.0
        near = 0
        for s, sd in zip(scores, sds):
            p = _above(s, sd, cut)
            acc += p if s >= cut else 1 - p
            con += p * p + (1 - p) * (1 - p)
            near += abs(s - cut) <= sd
        per_cut.append(
            {
                "level": cefr,
                "cut": cut,
                "accuracy": acc / n if n else None,
                "consistency": con / n if n else None,
                "near": near,
            }
        )
    acc = con = 0.0
    for s, sd in zip(scores, sds):
        above = [1.0] + [_above(s, sd, cut) for _, cut in cuts] + [0.0]
        probs = [a - b for a, b in zip(above, above[1:])]  # of each level, lowest first
        observed = sum(s >= cut for _, cut in cuts)
        acc += probs[observed]
        con += sum(q * q for q in probs)
    return {
        "n": n,
        "per_cut": per_cut,
        "accuracy": acc / n if n else None,
        "consistency": con / n if n else None,
    }


def format_rudner(report: dict, what: str) -> list[str]:
    """Human-readable lines of :func:`rudner`."""
    if not report["n"]:
        return [f"classification of {what}: none"]
    lines = [
        f"classification of {what} (Rudner, n={report['n']}): accuracy {report['accuracy']:.3f}, "
        f"consistency {report['consistency']:.3f}"
    ]
    for c in report["per_cut"]:
        lines.append(
            f"  cut {c['level']} at {c['cut']:g}: accuracy {c['accuracy']:.3f}, consistency {c['consistency']:.3f} "
            f"({c['near']} within one sd)"
        )
    return lines
