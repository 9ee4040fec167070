"""The candidate-level calibration: a split-conformal interval of the human overall score from held-out candidates.

A part's calibration (:mod:`serve.grading.calibration`) holds for one answer. A candidate's overall score is the
exam's rule applied to several answers, and the parts' intervals combine into an overall one only by the union
bound: valid, but wide (its stated coverage falls with every answer, its realised coverage is far above it). Where
candidates' own human overall scores exist, ``l2grader calibrate-candidates`` fits the overall interval on them
directly: the same conformal methods as the parts' (``absolute``; ``mondrian`` per predicted level, the default),
on candidates instead of answers, stored in the file the config's ``candidate.calibration.path`` names.

It keeps each held-out candidate's human and machine overall score and the **fingerprint** of everything the
overall score depends on: the rule's counting (each listed part's normalised weight, whether it is required, its
unscorable and missing rules, and the rule's own) and every counted part's score fingerprint
(:func:`serve.grading.fingerprint.score_fingerprint`: adapter, base model, prompt, scale, audio, engine). When any
component differs from what is served now, :func:`load` calls it stale, naming what changed, and the overall
interval falls back to the parts' union bound (:func:`serve.grading.answers.candidate_result`). Cut scores and
``interval_coverage`` are not part of it: they change no overall score.

What it promises: for a new candidate exchangeable with the calibration's (same population, same exam rule, same
scoring), the human overall score lies in the interval with probability at least the nominal coverage, on average
over candidates (``mondrian``: per predicted level). Nothing per candidate, and nothing for a population the
calibration candidates do not represent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError

from serve.grading.calibration import (
    FORMAT,
    CalibrationState,
    Records,
    SmallSample,
    read_file,
    stale_detail,
    write_file,
)
from serve.grading.config import CandidateConfig
from serve.grading.results import OverallInterval

#: The methods a candidate calibration offers (``scaled`` needs a per-candidate spread the overall has not).
METHODS = ("absolute", "mondrian")
DEFAULT_METHOD = "mondrian"


class CandidateCalibration(Records):
    """A candidate-level calibration as stored in the file ``candidate.calibration.path`` names. ``score_sd`` is
    kept at 0 for every candidate (the methods offered do not use it)."""

    format: int = FORMAT
    kind: Literal["candidate"] = "candidate"
    coverage: float = Field(0.9, gt=0.0, lt=1.0, description="The nominal coverage the sample size was judged at.")
    candidates: list[str] = Field(default_factory=list, description="The calibration candidates' ids.")
    small_sample: SmallSample | None = None
    data: str | None = Field(None, description="Where the machine overall scores came from.")
    human_data: str | None = Field(None, description="Where the human overall scores came from.")
    created: str | None = None


def _counting(rule: CandidateConfig) -> dict:
    """What of a part's rule changes overall scores: weights normalised over the listed parts (scaling them all
    changes nothing), whether required, and its own unscorable and missing rules."""
    total = sum(p.weight for p in rule.parts.values()) or 1.0
    return {
        p: json.dumps(
            {
                "weight": round(c.weight / total, 9),
                "required": c.required,
                "unscorable": c.model_dump(mode="json")["unscorable"],
                "missing": c.model_dump(mode="json")["missing"],
            },
            sort_keys=True,
        )
        for p, c in rule.parts.items()
    }


def fingerprint(rule: CandidateConfig, part_fingerprints: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """The components the candidates' overall scores depend on: the rule's counting and each counted part's score
    fingerprint (``part_fingerprints``: part -> :func:`serve.grading.fingerprint.score_fingerprint`; the rule's
    parts, or every part when it lists none)."""
    scope = sorted(rule.parts) if rule.parts else sorted(part_fingerprints)
    dumped = rule.model_dump(mode="json")
    out = {
        "rule": json.dumps({"unscorable": dumped["unscorable"], "missing": dumped["missing"]}, sort_keys=True),
        "parts": ",".join(scope),
    }
    counting = _counting(rule)
    for p in scope:
        if p in counting:
            out[f"{p}.counting"] = counting[p]
        fp = part_fingerprints.get(p)
        if fp is None:
            out[f"{p}.part"] = "not registered"
        else:
            out.update({f"{p}.{k}": str(v) for k, v in fp.items()})
    return out


def fit(
    fingerprint_: Mapping[str, str],
    scale: tuple[float, float],
    level_scores,
    human,
    scores,
    *,
    candidates=(),
    coverage: float = 0.9,
    small_sample: SmallSample | None = None,
    data: str | None = None,
    human_data: str | None = None,
) -> CandidateCalibration:
    """A candidate calibration from held-out candidates' human and machine overall scores."""
    import datetime as _dt

    if len(human) != len(scores) or len(human) == 0:
        raise ValueError("a candidate calibration needs at least one candidate, with a human and a machine score")
    return CandidateCalibration(
        fingerprint=dict(fingerprint_),
        scale=scale,
        level_scores=tuple(sorted(level_scores)),
        coverage=coverage,
        human=[float(x) for x in human],
        score=[float(x) for x in scores],
        score_sd=[0.0] * len(human),
        candidates=[str(c) for c in candidates],
        small_sample=small_sample,
        data=data,
        human_data=human_data,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def write(cal: CandidateCalibration, path: str | Path) -> Path:
    """Store the calibration at ``path`` (atomically)."""
    return write_file(cal, path)


def load(path: str | Path, fingerprint_: Mapping[str, str]) -> CalibrationState:
    """The candidate calibration at ``path``, checked against the fingerprint of what is served now. Its ``detail``
    goes into every candidate's result, so it names no file path (``l2grader check`` prints the path)."""
    path = Path(path)
    if not path.is_file():
        return CalibrationState(None, "uncalibrated", "no candidate calibration file (candidate.calibration.path)")
    try:
        cal = read_file(path, CandidateCalibration, "calibrate-candidates")
    except OSError as e:
        return CalibrationState(None, "invalid_calibration", f"the candidate calibration file: {e.strerror}")
    except (ValueError, RecursionError, ValidationError) as e:
        why = f"{type(e).__name__}: {str(e)[:300]}"
        return CalibrationState(None, "invalid_calibration", f"the candidate calibration file is invalid: {why}")
    what = stale_detail(cal.fingerprint, dict(fingerprint_))
    if what:
        return CalibrationState(None, "stale_calibration", f"fitted for another {what}")
    return CalibrationState(cal, "calibrated", f"{cal.n} candidates, fitted {cal.created or 'at an unrecorded time'}")


@dataclass(frozen=True)
class CandidateIntervals:
    """How a candidate's overall result gets its interval from the candidate calibration (when it is valid)."""

    state: CalibrationState = CalibrationState(
        None, "uncalibrated", "no candidate calibration configured (candidate.calibration)"
    )
    coverage: float = 0.9
    method: str = DEFAULT_METHOD

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown candidate interval method {self.method!r} (methods: {', '.join(METHODS)})")
        if self.state.calibration is not None:  # fit the rule once, not per candidate
            self.state.calibration.rule(self.method, self.coverage)

    def interval(self, score: float, answers: int) -> OverallInterval | None:
        """The overall interval of a candidate's score (None without a valid calibration)."""
        cal = self.state.calibration
        if cal is None:
            return None
        low, high = cal.rule(self.method, self.coverage).bounds(np.array([score]), np.array([0.0]))
        lo, hi = cal.scale
        low_c = min(max(lo, float(low[0])), hi)
        high_c = max(min(hi, float(high[0])), lo)
        return OverallInterval(
            low=round(low_c, 4),
            high=round(high_c, 4),
            width=round(high_c - low_c, 4),
            coverage=self.coverage,
            method="candidate_calibration",
            answers=answers,
            calibrated_on=cal.n,
        )


#: No candidate calibration configured: the overall interval is the parts' union bound.
NOT_CONFIGURED = CandidateIntervals()


def candidate_intervals(
    rule: CandidateConfig, part_fingerprints: Mapping[str, Mapping[str, str]]
) -> CandidateIntervals:
    """The candidate calibration the rule names, checked against the rule and the parts served now."""
    if rule.calibration is None:
        return NOT_CONFIGURED
    c = rule.calibration
    return CandidateIntervals(load(c.path, fingerprint(rule, part_fingerprints)), c.coverage, c.method)
