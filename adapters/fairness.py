"""Fairness across groups, as the standard for automated scoring judges it.

Per group of any field of the data (``--group-by l1,gender``), and for the whole set:

- **SMD**, the standardised mean difference, machine minus human, over the
  *population's* pooled SD: ``(mean(pred_g) - mean(human_g)) /
  sqrt((sd_pred^2 + sd_human^2) / 2)`` with both SDs those of the whole set
  (Williamson, Xi & Breyer 2012, "A framework for evaluation and use of
  automated scoring", Educational Measurement: Issues and Practice 31(1), 2-13;
  RSMTool's ``williamson`` SMD). A group is never divided by its own, narrower
  spread.
- **DSM**, the difference of standardised means: the group's mean machine score
  and mean human score, each as a z-score of the whole set's mean and SD of that
  score, machine minus human (RSMTool's subgroup DSM).
- **status**, judged on the SMD against :data:`SMD_LIMIT_OVERALL` (the whole
  set) or :data:`SMD_LIMIT_GROUP` (a subgroup): ``flagged`` when the point
  estimate lies beyond the limit (the standard's rule), ``clear`` when the
  whole 95 % interval lies inside the limits, ``inconclusive`` otherwise, and
  for a group too small to judge (fewer than :data:`MIN_ANSWERS` answers or
  :data:`MIN_CANDIDATES` candidates).
- The interval is a cluster bootstrap: the group's candidates are resampled
  with all their answers (an interview part has several answers per candidate,
  and they are not independent), :data:`BOOTSTRAP` times with a fixed seed; the
  population's SDs and means are held at their whole-set values.
- n (answers and candidates), mean error, PCC, RMSE, exact and adjacent level
  agreement, the review rate and, where the rows carry score intervals, the
  share of human scores inside them.

The **overall** table is the same on candidates: a candidate's score in a part
is the mean of their answers' scores there, and their overall score the mean
of their part scores, machine and human alike, over the parts where both are
known. A candidate is in a field's group when all their answers are;
answers that disagree put them in ``(mixed)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from adapters.agreement import DEFAULT_LEVEL_SCORES, level_index, pearson, rmse

#: |SMD| beyond which the whole set, and a subgroup, is flagged (Williamson, Xi & Breyer 2012).
SMD_LIMIT_OVERALL, SMD_LIMIT_GROUP = 0.15, 0.10
#: Bootstrap resamples of each group's SMD, and the interval's level.
BOOTSTRAP, CI_LEVEL = 2000, 0.95
#: The fewest answers and candidates a group needs to be judged (fewer: inconclusive).
MIN_ANSWERS, MIN_CANDIDATES = 10, 5
FLAGGED, CLEAR, INCONCLUSIVE = "flagged", "clear", "inconclusive"
#: How the overall score of a candidate is made, as the report states it.
OVERALL_RULE = (
    "per candidate: the mean of their answers' scores in each part, then the mean over the parts where both the "
    "machine and the human score are known"
)
MIXED = "(mixed)"


@dataclass(frozen=True)
class Row:
    """One evaluated answer: machine and human score, its review verdict, its group fields, its candidate (None:
    an answer of its own), its part, and the score interval it carried (None: none)."""

    pred: float
    human: float
    review: bool
    fields: Mapping[str, object]
    candidate: str | None = None
    part: str | None = None
    interval: tuple[float, float] | None = None


def group_of(fields: Mapping[str, object], field: str) -> str:
    """The group an answer is in by ``field`` ("(none)" when the data leaves it out or null)."""
    value = fields.get(field)
    return "(none)" if value is None else str(value)


def clusters(rows: Sequence[Row]) -> list[int]:
    """Each row's candidate as an index (an answer without a candidate is one of its own)."""
    keys = [r.candidate if r.candidate is not None else f"#answer{i}" for i, r in enumerate(rows)]
    index: dict[str, int] = {}
    return [index.setdefault(k, len(index)) for k in keys]


@dataclass(frozen=True)
class Population:
    """The whole set's means and SDs of the machine and the human scores, which every group is standardised by."""

    mean_pred: float
    mean_human: float
    sd_pred: float
    sd_human: float

    @classmethod
    def of(cls, pred: Sequence[float], human: Sequence[float]) -> Population:
        p, h = np.asarray(pred, float), np.asarray(human, float)
        sd = lambda x: float(x.std(ddof=1)) if len(x) > 1 else 0.0  # noqa: E731
        return cls(float(p.mean()), float(h.mean()), sd(p), sd(h))

    @property
    def pooled_sd(self) -> float:
        return math.sqrt((self.sd_pred**2 + self.sd_human**2) / 2)


def smd(pred: Sequence[float], human: Sequence[float], population: Population | None = None) -> float | None:
    """SMD of a group, machine minus human, over the population's pooled SD (the group's own when no population
    is given: the whole set); None when that SD is 0."""
    pop = population or Population.of(pred, human)
    if pop.pooled_sd == 0:
        return None
    return float((np.mean(pred) - np.mean(human)) / pop.pooled_sd)


def dsm(pred: Sequence[float], human: Sequence[float], population: Population) -> float | None:
    """Difference of standardised means: the group's mean z-score of the machine minus that of the human, each
    standardised by the population's mean and SD of that score; None when either SD is 0."""
    if population.sd_pred == 0 or population.sd_human == 0:
        return None
    zp = (np.mean(pred) - population.mean_pred) / population.sd_pred
    zh = (np.mean(human) - population.mean_human) / population.sd_human
    return float(zp - zh)


def cluster_interval(
    values: Sequence[float],
    candidates: Sequence[int],
    scale: float,
    shift: float = 0.0,
    n_boot: int = BOOTSTRAP,
    level: float = CI_LEVEL,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``(mean(values) - shift) / scale``, resampling candidates with all their
    answers; None with fewer than two candidates or a zero scale."""
    v = np.asarray(values, float)
    _, c = np.unique(np.asarray(candidates), return_inverse=True)
    k = int(c.max()) + 1 if len(c) else 0
    if k < 2 or scale == 0:
        return None
    sums, counts = np.bincount(c, weights=v, minlength=k), np.bincount(c, minlength=k).astype(float)
    idx = np.random.default_rng(seed).integers(0, k, size=(n_boot, k))  # candidates drawn with replacement
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile((means - shift) / scale, [tail, 100 - tail])
    return float(lo), float(hi)


def smd_interval(
    pred: Sequence[float],
    human: Sequence[float],
    candidates: Sequence[int] | None = None,
    population: Population | None = None,
    n_boot: int = BOOTSTRAP,
    level: float = CI_LEVEL,
    seed: int = 0,
) -> tuple[float, float] | None:
    """The cluster bootstrap interval of :func:`smd` (``candidates``: each answer's candidate; none: every answer
    its own); None when undefined."""
    pop = population or Population.of(pred, human)
    diff = np.asarray(pred, float) - np.asarray(human, float)
    cand = list(range(len(diff))) if candidates is None else candidates
    return cluster_interval(diff, cand, pop.pooled_sd, n_boot=n_boot, level=level, seed=seed)


def status_of(point: float | None, interval: tuple[float, float] | None, limit: float, judged: bool = True) -> str:
    """``flagged`` (point beyond the limit), ``clear`` (whole interval inside) or ``inconclusive``."""
    if not judged or point is None:
        return INCONCLUSIVE
    if abs(point) > limit:
        return FLAGGED
    if interval is not None and -limit <= interval[0] and interval[1] <= limit:
        return CLEAR
    return INCONCLUSIVE


def _nan_to_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def group_stats(
    field: str,
    group: str,
    members: Sequence[Row],
    population: Population,
    limit: float,
    level_scores: Sequence[float] = DEFAULT_LEVEL_SCORES,
    seed: int = 0,
) -> dict:
    """One line of the fairness table."""
    p = np.array([r.pred for r in members], float)
    h = np.array([r.human for r in members], float)
    cand = clusters(members)
    n_cand = len(set(cand))
    judged = len(members) >= MIN_ANSWERS and n_cand >= MIN_CANDIDATES
    point = smd(p, h, population)
    ci = smd_interval(p, h, cand, population, seed=seed) if judged else None
    z = np.array([population.sd_pred, population.sd_human])
    dsm_ci = (
        cluster_interval((p - population.mean_pred) / z[0] - (h - population.mean_human) / z[1], cand, 1.0, seed=seed)
        if judged and z.all()
        else None
    )
    pi, hi = level_index(p, level_scores), level_index(h, level_scores)
    carried = [r for r in members if r.interval is not None]
    return {
        "field": field,
        "group": group,
        "n": len(members),
        "n_candidates": n_cand,
        "mean_error": float((p - h).mean()),
        "smd": point,
        "smd_ci": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
        "dsm": dsm(p, h, population),
        "dsm_ci": None if dsm_ci is None else [round(dsm_ci[0], 4), round(dsm_ci[1], 4)],
        "smd_limit": limit,
        "status": status_of(point, ci, limit, judged),
        "too_small": not judged,
        "pcc": _nan_to_none(pearson(p, h)) if len(members) > 1 else None,
        "rmse": rmse(p, h),
        "exact": float(np.mean(pi == hi)),
        "adjacent": float(np.mean(np.abs(pi - hi) <= 1)),
        "review_rate": float(np.mean([r.review for r in members])),
        "interval_coverage": (
            float(np.mean([r.interval[0] <= r.human <= r.interval[1] for r in carried])) if carried else None
        ),
        "n_intervals": len(carried),
    }


def group_table(
    rows: Sequence[Row], group_by: Sequence[str], level_scores: Sequence[float] = DEFAULT_LEVEL_SCORES, seed: int = 0
) -> list[dict]:
    """The fairness table: the whole set, then every group of every field in ``group_by``."""
    pop = Population.of([r.pred for r in rows], [r.human for r in rows])
    table = [group_stats("all", "all", rows, pop, SMD_LIMIT_OVERALL, level_scores, seed)]
    for field in group_by:
        for value in sorted({group_of(r.fields, field) for r in rows}):
            members = [r for r in rows if group_of(r.fields, field) == value]
            table.append(group_stats(field, value, members, pop, SMD_LIMIT_GROUP, level_scores, seed))
    return table


def overall_rows(rows: Sequence[Row], group_by: Sequence[str]) -> list[Row]:
    """One row per candidate with their overall scores (:data:`OVERALL_RULE`): reviewed when any of their answers
    was, no interval, and each field's group when all their answers share it (else :data:`MIXED`)."""
    by: dict[int, list[Row]] = {}
    for c, r in zip(clusters(rows), rows):
        by.setdefault(c, []).append(r)
    out = []
    for c, answers in by.items():
        parts: dict[str | None, list[Row]] = {}
        for r in answers:
            parts.setdefault(r.part, []).append(r)
        pred = float(np.mean([np.mean([r.pred for r in rs]) for rs in parts.values()]))
        human = float(np.mean([np.mean([r.human for r in rs]) for rs in parts.values()]))
        fields = {}
        for f in group_by:
            values = {group_of(r.fields, f) for r in answers}
            fields[f] = values.pop() if len(values) == 1 else MIXED
        out.append(Row(pred, human, any(r.review for r in answers), fields, candidate=f"candidate{c}"))
    return out


def fairness_report(
    rows: Sequence[Row], group_by: Sequence[str], level_scores: Sequence[float] = DEFAULT_LEVEL_SCORES
) -> dict:
    """The fairness tables of each part's answers and of the candidates' overall scores, with the rules used."""
    parts = sorted({r.part for r in rows}, key=str)
    return {
        "limits": {"overall": SMD_LIMIT_OVERALL, "group": SMD_LIMIT_GROUP, "level": CI_LEVEL},
        "min_group": {"answers": MIN_ANSWERS, "candidates": MIN_CANDIDATES},
        "parts": {
            str(part): group_table([r for r in rows if r.part == part], group_by, level_scores) for part in parts
        },
        "overall_rule": OVERALL_RULE,
        "overall": group_table(overall_rows(rows, group_by), group_by, level_scores),
    }


def format_table(table: Sequence[dict]) -> list[str]:
    """Human-readable lines of one fairness table."""
    lines = [
        f"  {'group':<26}{'n':>5}{'cand':>6}{'mean err':>9}{'SMD':>8}{'95% interval':>17}{'DSM':>8}"
        f"{'exact':>7}{'adj':>6}{'review':>7}{'cover':>7}  status"
    ]
    for g in table:
        name = "all" if g["field"] == "all" else f"{g['field']}={g['group']}"
        ci = g["smd_ci"]
        ci_text = "too small" if g["too_small"] else "-" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
        smd_text = "-" if g["smd"] is None else f"{g['smd']:+.3f}"
        dsm_text = "-" if g["dsm"] is None else f"{g['dsm']:+.3f}"
        cover = "-" if g["interval_coverage"] is None else f"{100 * g['interval_coverage']:.0f}%"
        status = g["status"].upper() if g["status"] == FLAGGED else g["status"]
        lines.append(
            f"  {name[:26]:<26}{g['n']:>5}{g['n_candidates']:>6}{g['mean_error']:>+9.3f}{smd_text:>8}{ci_text:>17}"
            f"{dsm_text:>8}{100 * g['exact']:>6.0f}%{100 * g['adjacent']:>5.0f}%{100 * g['review_rate']:>6.0f}%"
            f"{cover:>7}  {status} (limit {g['smd_limit']:.2f})"
        )
    return lines


def format_fairness(report: dict) -> list[str]:
    """Human-readable lines of :func:`fairness_report`."""
    lines = []
    for part, table in report["parts"].items():
        lines.append(f"fairness of part {part}'s answers (SMD on the whole set's pooled SD):")
        lines += format_table(table)
    lines.append(f"fairness of the overall score ({report['overall_rule']}):")
    return lines + format_table(report["overall"])
