"""Calibrated score intervals: conformal prediction from held-out answers with human scores.

A part's calibration is computed once from answers the adapter was neither
trained on nor later tested on (``l2grader calibrate``) and stored beside the
adapter (``calibration.json``). It keeps each held-out answer's human score,
soft score, score_sd and chunk count, and the **fingerprint** of everything
that made those scores (:mod:`serve.grading.fingerprint`: adapter weights,
base model, rendered prompt, scale, audio preparation, engine numerics). A
part whose fingerprint differs in any component is served without an
interval (``stale_calibration``, naming what changed).

Methods (``interval.method`` in the part's config):

- ``absolute``: ``score +- q``, ``q`` the conformal quantile of ``|human - score|``;
  one width for every answer. Holds on average only.
- ``scaled``: ``score +- q * max(score_sd, SD_FLOOR)``; narrow where the
  model is sure. Holds on average only, and fails per bin where the
  score_sd does not track the error (near a whole level, a model trained
  with the fair-average loss puts its mass on one label: sd ~ 0).
- ``mondrian`` (the default, chosen on the worst bin of the simulations in
  ``docs/trust.md``): Mondrian conformal regression (Vovk et al. 2005,
  ch. 4; Boström & Johansson's ``crepes``) with the answer's predicted level
  as its category: per level, the two-sided quantiles of the signed error
  ``human - score``, so a level whose scores are biased (regression to the
  mean at A1 and C2) gets its own, shifted interval, and a level where the
  model is sure but wrong gets no narrower one. It holds per predicted
  level by construction; per human level it cannot be promised (no method
  conditions on the unknown human score), and ``evaluate`` measures it.

Each conformal quantile is the ``ceil((n + 1) * c)``-th smallest score
(Angelopoulos & Bates 2021): for a new answer exchangeable with the
calibration answers of its bin, the human score lies in the interval with
probability at least ``c``. A bin is merged with its neighbour until it has
:func:`min_bin_answers` answers. Intervals are clipped to the scale for
display; ``width_unclipped`` keeps the width before clipping (the review's
``wide_interval`` judges that, so an answer at A1 or C2 is judged like one
at B1).

Why hand-written and not MAPIE or crepes: serving computes one interval per
answer in the scorer, from a JSON file, without scikit-learn or pandas in
the service image; each method is a few array quantiles.
``tests/test_calibration.py`` checks them per bin on simulated model
outputs of several shapes.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from serve.grading.results import ScoreInterval

CALIBRATION_FILE = "calibration.json"
METHODS = ("absolute", "scaled", "mondrian")
Method = Literal["absolute", "scaled", "mondrian"]
DEFAULT_METHOD: Method = "mondrian"
#: The smallest score_sd the scaled method divides by (a very sure model still errs).
SD_FLOOR = 0.1
#: Most answers a calibration keeps, and the largest file read.
MAX_ANSWERS = 200_000
MAX_FILE_BYTES = 64 << 20
FORMAT = 2
#: Fewest answers a Mondrian bin keeps before it is merged with a neighbour.
MIN_BIN = 30


class SmallSample(BaseModel):
    """Recorded when a calibration was allowed fewer answers than :func:`required_answers` asks."""

    model_config = ConfigDict(extra="forbid")

    required: int = Field(
        description="Answers needed for the 5-95 % range of realised coverage to lie within 0.05 of nominal."
    )
    coverage_range: tuple[float, float] = Field(description="5-95 % range of the realised coverage at this n.")


class Records(BaseModel):
    """Held-out answers' human scores, soft scores and score_sds, with the fingerprint of what scored them: what a
    part's holistic score and each of its aspects are calibrated from."""

    model_config = ConfigDict(extra="forbid")

    fingerprint: dict[str, str] = Field(
        description="Component -> identity of everything that changes a score (serve.grading.fingerprint)."
    )
    scale: tuple[float, float] = Field(description="Lowest and highest score of the levels.")
    level_scores: tuple[float, ...] = Field(description="The level scores, lowest first (the bins).")
    sd_floor: float = SD_FLOOR
    human: list[float]
    score: list[float]
    score_sd: list[float]

    _rules: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Records:
        n = len(self.human)
        if not 1 <= n <= MAX_ANSWERS or len(self.score) != n or len(self.score_sd) != n:
            raise ValueError(f"1-{MAX_ANSWERS} answers needed, each with a human score, a score and a score_sd")
        for name in ("human", "score", "score_sd"):
            a = np.asarray(getattr(self, name), dtype=np.float64)
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{name}: finite numbers needed")
        if np.any(np.asarray(self.score_sd) < 0):
            raise ValueError("score_sd must be non-negative")
        lo, hi = self.scale
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError("scale must be two finite scores, lowest first")
        if len(self.level_scores) < 2 or list(self.level_scores) != sorted(set(self.level_scores)):
            raise ValueError("level_scores must be two or more distinct scores, lowest first")
        if not (math.isfinite(self.sd_floor) and self.sd_floor > 0):
            raise ValueError("sd_floor must be positive")
        return self

    @property
    def n(self) -> int:
        return len(self.human)

    def rule(self, method: str, coverage: float) -> IntervalRule:
        """The method's interval rule at ``coverage`` (built once per calibration, method and coverage)."""
        key = (method, round(coverage, 6))
        if key not in self._rules:
            self._rules[key] = build_rule(
                method,
                coverage,
                np.asarray(self.human),
                np.asarray(self.score),
                np.asarray(self.score_sd),
                self.level_scores,
                self.scale,
                self.sd_floor,
            )
        return self._rules[key]

    def interval(self, method: str, coverage: float, score: float, score_sd: float) -> ScoreInterval:
        """The interval of one answer (its soft score and score_sd)."""
        low, high = self.rule(method, coverage).bounds(np.array([score]), np.array([score_sd]))
        return to_interval(float(low[0]), float(high[0]), self.scale, coverage, method, self.n)


class AspectValidation(BaseModel):
    """The evidence that an aspect's score measures its own aspect (:func:`adapters.agreement.aspect_validation`)."""

    model_config = ConfigDict(extra="forbid")

    n: int
    pcc_own: float | None = Field(description="PCC of the aspect's scores with its own human scores.")
    pcc_holistic: float | None = Field(description="PCC of the holistic scores with the aspect's human scores.")
    added_value_ci: tuple[float, float] | None = Field(
        description="95 % bootstrap interval of pcc_own - pcc_holistic (by speaker): the aspect's added value."
    )
    validated: bool = Field(description="Its own agreement and its added value both clear zero with confidence.")
    reason: str


class AspectCalibration(Records):
    """An aspect's held-out records (its own human scores) and its validation evidence."""

    validation: AspectValidation


class Calibration(Records):
    """A part's calibration, as stored in ``calibration.json`` beside its adapter."""

    format: int = FORMAT
    part: str
    coverage: float = Field(0.9, gt=0.0, lt=1.0, description="The nominal coverage the sample size was judged at.")
    chunks: list[int] = Field(default_factory=list, description="Chunks of each answer (empty: not recorded).")
    answers: list[str] = Field(default_factory=list, description="Content hashes of the calibration answers' audio.")
    speakers: list[str] = Field(default_factory=list, description="Candidates/speakers of the calibration answers.")
    small_sample: SmallSample | None = None
    aspects: dict[str, AspectCalibration] = Field(
        default_factory=dict, description="Aspect -> its records and validation, where the data had its human scores."
    )
    data: str | None = Field(None, description="Where the calibration answers came from.")
    created: str | None = None

    @model_validator(mode="after")
    def _chunks(self) -> Calibration:
        if self.chunks and len(self.chunks) != self.n:
            raise ValueError("chunks must have one entry per answer")
        return self


def to_interval(low: float, high: float, scale: tuple[float, float], coverage: float, method: str, n: int):
    """An answer's :class:`ScoreInterval`: clipped to the scale for display, its width before clipping kept."""
    lo, hi = scale
    raw = high - low
    low_c, high_c = min(max(lo, low), hi), max(min(hi, high), lo)
    return ScoreInterval(
        low=round(low_c, 4),
        high=round(high_c, 4),
        width=round(high_c - low_c, 4),
        width_unclipped=round(raw, 4) if math.isfinite(raw) else None,
        coverage=coverage,
        method=method,
        calibrated_on=n,
    )


# ------------------------------------------------------------------ the rules


def upper_quantile(sorted_scores: np.ndarray, c: float) -> float:
    """The conformal upper quantile: the ``ceil((n + 1) c)``-th smallest (infinite when n is too small)."""
    n = len(sorted_scores)
    k = math.ceil((n + 1) * c - 1e-9)
    return math.inf if k > n or n == 0 else float(sorted_scores[k - 1])


def lower_quantile(sorted_scores: np.ndarray, a: float) -> float:
    """The conformal lower quantile: the ``floor((n + 1) a)``-th smallest (minus infinity when n is too small)."""
    k = math.floor((len(sorted_scores) + 1) * a + 1e-9)
    return -math.inf if k < 1 else float(sorted_scores[k - 1])


def min_bin_answers(coverage: float) -> int:
    """Fewest answers a bin keeps: both two-sided quantiles finite, and at least :data:`MIN_BIN`."""
    return max(MIN_BIN, math.ceil(2 / (1 - coverage)))


def nearest(values: np.ndarray, grid: Sequence[float]) -> np.ndarray:
    """Index of the grid point nearest each value (ties to the lower)."""
    g = np.asarray(grid, dtype=np.float64)
    mids = (g[:-1] + g[1:]) / 2
    return np.searchsorted(mids, values, side="right")


def merged_runs(counts: Sequence[int], min_n: int) -> list[tuple[int, int]]:
    """Contiguous runs ``[start, end]`` of bins, the smallest merged with its smaller neighbour until each run
    holds ``min_n`` (or there is one run)."""
    runs = [[i, i, int(c)] for i, c in enumerate(counts)]
    while len(runs) > 1:
        j = min(range(len(runs)), key=lambda i: runs[i][2])
        if runs[j][2] >= min_n:
            break
        if j == 0:
            k = 1
        elif j == len(runs) - 1:
            k = j - 1
        else:
            k = j - 1 if runs[j - 1][2] <= runs[j + 1][2] else j + 1
        a, b = min(j, k), max(j, k)
        runs[a] = [runs[a][0], runs[b][1], runs[a][2] + runs[b][2]]
        del runs[b]
    return [(a, b) for a, b, _ in runs]


@dataclass(frozen=True)
class IntervalRule:
    """How one method turns answers' (score, score_sd) into (low, high) before clipping, vectorised."""

    method: str
    coverage: float
    bounds: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    detail: dict = field(default_factory=dict)  # what the rule was built from (its quantile, or its bins), for reports


def _absolute(h, s, sd, c, floor):
    q = upper_quantile(np.sort(np.abs(h - s)), c)
    return lambda st, sdt: (st - q, st + q), {"q": q}


def _scaled(h, s, sd, c, floor):
    q = upper_quantile(np.sort(np.abs(h - s) / np.maximum(sd, floor)), c)
    return lambda st, sdt: (st - q * np.maximum(sdt, floor), st + q * np.maximum(sdt, floor)), {"q": q}


def _mondrian(h, s, c, levels):
    """Per predicted level (merged to :func:`min_bin_answers`): two-sided quantiles of the signed error."""
    idx = nearest(s, levels)
    runs = merged_runs(np.bincount(idx, minlength=len(levels)), min_bin_answers(c))
    a = (1 - c) / 2
    of_level = np.empty(len(levels), dtype=int)
    lo_q, hi_q = np.empty(len(runs)), np.empty(len(runs))
    for r, (start, end) in enumerate(runs):
        of_level[start : end + 1] = r
        e = np.sort((h - s)[(idx >= start) & (idx <= end)])
        lo_q[r], hi_q[r] = lower_quantile(e, a), upper_quantile(e, 1 - a)

    def bounds(st, sdt):
        r = of_level[nearest(st, levels)]
        return st + lo_q[r], st + hi_q[r]

    return bounds, {"bins": [[levels[a_], levels[b_]] for a_, b_ in runs]}


def build_rule(method, coverage, h, s, sd, levels, scale, sd_floor=SD_FLOOR) -> IntervalRule:
    """The interval rule of ``method`` at ``coverage``, fitted on calibration answers (human, score, score_sd)."""
    if method == "absolute":
        bounds, detail = _absolute(h, s, sd, coverage, sd_floor)
    elif method == "scaled":
        bounds, detail = _scaled(h, s, sd, coverage, sd_floor)
    elif method == "mondrian":
        bounds, detail = _mondrian(h, s, coverage, levels)
    else:
        raise ValueError(f"unknown interval method {method!r} (methods: {', '.join(METHODS)})")
    return IntervalRule(method, coverage, bounds, detail)


def intervals_of(
    rule: IntervalRule, scores: Sequence[float], score_sds: Sequence[float], scale: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Many answers' intervals, clipped to the scale (for measuring coverage)."""
    low, high = rule.bounds(np.asarray(scores, dtype=np.float64), np.asarray(score_sds, dtype=np.float64))
    return np.clip(low, *scale), np.clip(high, *scale)


def fit(
    part: str,
    fingerprint: dict[str, str],
    scale: tuple[float, float],
    level_scores: Sequence[float],
    human: Sequence[float],
    scores: Sequence[float],
    score_sds: Sequence[float],
    *,
    chunks: Sequence[int] = (),
    answers: Sequence[str] = (),
    speakers: Sequence[str] = (),
    coverage: float = 0.9,
    small_sample: SmallSample | None = None,
    aspects: dict[str, AspectCalibration] | None = None,
    data: str | None = None,
) -> Calibration:
    """A calibration from held-out answers: their human scores, soft scores and score_sds."""
    if not len(human) == len(scores) == len(score_sds) or len(human) == 0:
        raise ValueError("a calibration needs at least one answer, with a score and a score_sd for each")
    return Calibration(
        part=part,
        fingerprint=dict(fingerprint),
        scale=scale,
        level_scores=tuple(sorted(level_scores)),
        coverage=coverage,
        human=[float(x) for x in human],
        score=[float(x) for x in scores],
        score_sd=[float(x) for x in score_sds],
        chunks=[int(x) for x in chunks],
        answers=list(answers),
        speakers=sorted(set(speakers)),
        small_sample=small_sample,
        aspects=aspects or {},
        data=data,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def write(calibration: Calibration, adapter_dir: str | Path) -> Path:
    """Store the calibration beside the adapter."""
    return write_file(calibration, Path(adapter_dir) / CALIBRATION_FILE)


def write_file(record: Records, path: str | Path) -> Path:
    """Store a calibration at ``path`` (atomically: a reader sees the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(record.model_dump_json() + "\n")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ serving


@dataclass(frozen=True)
class CalibrationState:
    """A part's calibration as found beside its adapter: the calibration when it is valid, and the status."""

    calibration: Records | None  # a part's Calibration, or one of its AspectCalibrations
    status: str  # one of serve.grading.results.INTERVAL_STATUSES
    detail: str = ""


UNCALIBRATED = CalibrationState(None, "uncalibrated", "the part has no calibration")


def aspect_state(part: CalibrationState, aspect: str, fingerprint: dict[str, str]) -> CalibrationState:
    """An aspect's calibration within its part's (valid only when the part's is, and its own fingerprint matches)."""
    if part.calibration is None:
        return CalibrationState(None, part.status, f"the part's calibration: {part.detail}")
    rec = part.calibration.aspects.get(aspect)
    if rec is None:
        return CalibrationState(None, "uncalibrated", f"the calibration data had no human {aspect} scores")
    changed = stale_components(rec.fingerprint, fingerprint)
    if changed:
        return CalibrationState(None, "stale_calibration", f"aspect {aspect}: another {', '.join(changed)}")
    return CalibrationState(rec, "calibrated", f"aspect {aspect}: {rec.n} answers")


def stale_components(calibrated: dict[str, str], serving: dict[str, str]) -> list[str]:
    """The fingerprint components that differ between a calibration and what a part serves now."""
    return [k for k in sorted(set(calibrated) | set(serving)) if calibrated.get(k) != serving.get(k)]


def read_file(path: Path, model: type[Records], command: str) -> Records:
    """A calibration file as ``model``, parsed and checked once per version of the file (``command`` remakes it)."""
    st = path.stat()
    return _read(str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, model, command)


@functools.lru_cache(maxsize=40)
def _read(path: str, size: int, mtime_ns: int, ctime_ns: int, model: type[Records], command: str) -> Records:
    """Keyed by the file's size and change times: a new version is read again."""
    if size > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    raw = json.loads(Path(path).read_bytes())
    if isinstance(raw, dict) and raw.get("format") != FORMAT:
        raise ValueError(f"format {raw.get('format')!r}, {FORMAT} expected: run `l2grader {command}` again")
    return model.model_validate(raw)


def stale_detail(calibrated: dict[str, str], serving: dict[str, str]) -> str | None:
    """What differs between a calibration's fingerprint and what is served now, in words; None when nothing."""
    changed = stale_components(calibrated, serving)
    if not changed:
        return None
    return "; ".join(f"{k} (calibrated {calibrated.get(k)}, serving {serving.get(k)})" for k in changed)


def load(adapter_dir: str | Path | None, fingerprint: dict[str, str]) -> CalibrationState:
    """The calibration stored beside an adapter, checked against the fingerprint of what the part serves now."""
    if adapter_dir is None:
        return CalibrationState(None, "uncalibrated", "the part has no adapter (base model): no calibration")
    path = Path(adapter_dir) / CALIBRATION_FILE
    if not path.is_file():
        return CalibrationState(None, "uncalibrated", f"no {CALIBRATION_FILE} beside the adapter {adapter_dir}")
    try:
        cal = read_file(path, Calibration, "calibrate")
    except (OSError, ValueError, RecursionError, ValidationError) as e:
        return CalibrationState(None, "invalid_calibration", f"{path}: {type(e).__name__}: {str(e)[:300]}")
    what = stale_detail(cal.fingerprint, fingerprint)
    if what:
        return CalibrationState(None, "stale_calibration", f"{path} was computed for another {what}")
    return CalibrationState(cal, "calibrated", f"{path}: {cal.n} answers from {cal.data or 'unrecorded data'}")


@dataclass(frozen=True)
class Intervals:
    """How a part's answers get their interval: its calibration state, the coverage and the method."""

    state: CalibrationState = UNCALIBRATED
    coverage: float = 0.9
    method: str = DEFAULT_METHOD

    def __post_init__(self) -> None:
        if self.state.calibration is not None:  # fit the rule once, when the part is resolved, not per answer
            self.state.calibration.rule(self.method, self.coverage)

    def of(self, score: float, score_sd: float) -> tuple[ScoreInterval | None, str]:
        """The answer's interval (None without a valid calibration) and the status."""
        if self.state.calibration is None:
            return None, self.state.status
        return self.state.calibration.interval(self.method, self.coverage, score, score_sd), self.state.status


#: Coverage levels ``calibrate`` and ``evaluate`` report.
REPORT_COVERAGES = (0.8, 0.9, 0.95)


def audio_id(data: bytes) -> str:
    """The id a calibration keeps of each answer it was computed from: the audio file's sha256, 16 hex digits."""

    return hashlib.sha256(data).hexdigest()[:16]
