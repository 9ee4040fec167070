"""Calibrated score intervals: split conformal prediction from held-out answers with human scores.

A part's calibration is computed once from answers the adapter was not
trained on (``l2grader calibrate``) and stored beside the adapter
(``calibration.json``), tied to the adapter's content hash: a new adapter is
never served with an old calibration (its answers say ``stale_calibration``
and carry no interval).

For each held-out answer the calibration keeps a nonconformity score, one per
method, sorted:

- ``absolute``: ``|human - score|``; the interval is ``score +- q``, the same
  width for every answer;
- ``scaled``: ``|human - score| / max(score_sd, SD_FLOOR)``; the interval is
  ``score +- q * max(score_sd, SD_FLOOR)``, narrow where the model is sure.

``q`` is the ``ceil((n + 1) * coverage)``-th smallest score: for a new answer
exchangeable with the calibration set, the human score lies in the interval
with probability at least ``coverage`` (Vovk et al. 2005; Angelopoulos &
Bates 2021, "A gentle introduction to conformal prediction"). Intervals are
clipped to the scale, where every human score lies. With too few answers for
the coverage asked, ``q`` is infinite and the interval is the whole scale.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve.grading.results import ScoreInterval

CALIBRATION_FILE = "calibration.json"
METHODS = ("absolute", "scaled")
Method = Literal["absolute", "scaled"]
#: The smallest score_sd the scaled method divides by (a very sure model still errs).
SD_FLOOR = 0.1
#: Most answers a calibration keeps, and the largest file read.
MAX_ANSWERS = 200_000
MAX_FILE_BYTES = 32 << 20
FORMAT = 1


class Calibration(BaseModel):
    """A part's calibration, as stored in ``calibration.json`` beside its adapter."""

    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT
    part: str
    adapter_hash: str | None = Field(description="Content hash of the adapter whose answers were calibrated.")
    scale: tuple[float, float] = Field(description="Lowest and highest score of the part's levels.")
    sd_floor: float = SD_FLOOR
    n: int = Field(ge=1)
    residuals: dict[Method, list[float]] = Field(description="Method -> sorted nonconformity scores.")
    answers: list[str] = Field(default_factory=list, description="Content hashes of the calibration answers' audio.")
    data: str | None = Field(None, description="Where the calibration answers came from.")
    created: str | None = None

    @field_validator("residuals")
    @classmethod
    def _sorted_finite(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for method, r in v.items():
            a = np.asarray(r, dtype=np.float64)
            if a.size == 0 or a.size > MAX_ANSWERS or not np.all(np.isfinite(a)) or np.any(a < 0):
                raise ValueError(f"{method}: 1-{MAX_ANSWERS} finite non-negative scores needed")
            v[method] = sorted(float(x) for x in a)
        return v

    @model_validator(mode="after")
    def _complete(self) -> Calibration:
        missing = [m for m in METHODS if m not in self.residuals]
        if missing:
            raise ValueError(f"residuals of {missing} missing")
        if not (math.isfinite(self.scale[0]) and math.isfinite(self.scale[1]) and self.scale[0] < self.scale[1]):
            raise ValueError("scale must be two finite scores, lowest first")
        if not (math.isfinite(self.sd_floor) and self.sd_floor > 0):
            raise ValueError("sd_floor must be positive")
        return self

    def quantile(self, method: str, coverage: float) -> float:
        """The conformal quantile ``q`` of ``method`` at ``coverage`` (infinite when there are too few answers)."""
        r = self.residuals[method]
        k = math.ceil((len(r) + 1) * coverage)
        return math.inf if k > len(r) else r[k - 1]

    def interval(self, method: str, coverage: float, score: float, score_sd: float) -> ScoreInterval:
        """The interval of one answer (its soft score and score_sd)."""
        q = self.quantile(method, coverage)
        half = q if method == "absolute" else q * max(score_sd, self.sd_floor)
        lo, hi = self.scale
        low, high = max(lo, score - half), min(hi, score + half)
        return ScoreInterval(
            low=round(low, 4),
            high=round(high, 4),
            width=round(high - low, 4),
            coverage=coverage,
            method=method,
            calibrated_on=len(self.residuals[method]),
        )


def nonconformity(method: str, human: float, score: float, score_sd: float, sd_floor: float = SD_FLOOR) -> float:
    """How far an answer's human score lies from its prediction, in the method's units."""
    err = abs(human - score)
    return err if method == "absolute" else err / max(score_sd, sd_floor)


def fit(
    part: str,
    adapter_hash: str | None,
    scale: tuple[float, float],
    human: Sequence[float],
    scores: Sequence[float],
    score_sds: Sequence[float],
    *,
    answers: Sequence[str] = (),
    data: str | None = None,
) -> Calibration:
    """A calibration from held-out answers: their human scores, soft scores and score_sds."""
    if not len(human) == len(scores) == len(score_sds) or len(human) == 0:
        raise ValueError("a calibration needs at least one answer, with a score and a score_sd for each")
    return Calibration(
        part=part,
        adapter_hash=adapter_hash,
        scale=scale,
        n=len(human),
        residuals={m: [nonconformity(m, h, s, sd) for h, s, sd in zip(human, scores, score_sds)] for m in METHODS},
        answers=list(answers),
        data=data,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def write(calibration: Calibration, adapter_dir: str | Path) -> Path:
    """Store the calibration beside the adapter (atomically: a reader sees the old file or the new one)."""
    path = Path(adapter_dir) / CALIBRATION_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(calibration.model_dump_json() + "\n")
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class CalibrationState:
    """A part's calibration as found beside its adapter: the calibration when it is valid, and the status."""

    calibration: Calibration | None
    status: str  # one of serve.grading.results.INTERVAL_STATUSES
    detail: str = ""


UNCALIBRATED = CalibrationState(None, "uncalibrated", "the part has no calibration")


def load(adapter_dir: str | Path | None, adapter_hash: str | None) -> CalibrationState:
    """The calibration stored beside an adapter, checked against the adapter's content hash."""
    if adapter_dir is None:
        return CalibrationState(None, "uncalibrated", "the part has no adapter (base model): no calibration")
    path = Path(adapter_dir) / CALIBRATION_FILE
    if not path.is_file():
        return UNCALIBRATED
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        cal = Calibration.model_validate(json.loads(path.read_bytes()))
    except (OSError, ValueError, RecursionError, ValidationError) as e:
        return CalibrationState(None, "invalid_calibration", f"{path}: {type(e).__name__}: {str(e)[:200]}")
    if cal.format != FORMAT:
        return CalibrationState(None, "invalid_calibration", f"{path}: format {cal.format}, {FORMAT} expected")
    if cal.adapter_hash != adapter_hash:
        return CalibrationState(
            None,
            "stale_calibration",
            f"{path} was computed for adapter {cal.adapter_hash}, the part serves {adapter_hash}",
        )
    return CalibrationState(cal, "calibrated")


@dataclass(frozen=True)
class Intervals:
    """How a part's answers get their interval: its calibration state, the coverage and the method."""

    state: CalibrationState = UNCALIBRATED
    coverage: float = 0.9
    method: str = "scaled"

    def of(self, score: float, score_sd: float) -> tuple[ScoreInterval | None, str]:
        """The answer's interval (None without a valid calibration) and the status."""
        if self.state.calibration is None:
            return None, self.state.status
        return self.state.calibration.interval(self.method, self.coverage, score, score_sd), self.state.status


#: Coverage levels ``evaluate`` reports.
REPORT_COVERAGES = (0.8, 0.9, 0.95)


def coverage_table(
    calibration: Calibration,
    human: Sequence[float],
    scores: Sequence[float],
    score_sds: Sequence[float],
    coverages: Sequence[float] = REPORT_COVERAGES,
) -> list[dict]:
    """Empirical coverage and mean width of each method's intervals at each nominal coverage, on answers that
    were not calibrated on."""
    rows = []
    for method in METHODS:
        for c in coverages:
            ivs = [calibration.interval(method, c, s, sd) for s, sd in zip(scores, score_sds)]
            hit = [iv.low - 1e-9 <= h <= iv.high + 1e-9 for iv, h in zip(ivs, human)]
            rows.append(
                {
                    "method": method,
                    "nominal": c,
                    "coverage": float(np.mean(hit)) if hit else None,
                    "mean_width": float(np.mean([iv.width for iv in ivs])) if ivs else None,
                    "n": len(ivs),
                }
            )
    return rows


def audio_id(data: bytes) -> str:
    """The id a calibration keeps of each answer it was computed from: the audio file's sha256, 16 hex digits."""

    return hashlib.sha256(data).hexdigest()[:16]
