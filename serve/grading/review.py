"""The review verdict of a scored answer: which of its audio-quality and uncertainty signals cross the part's
thresholds (:class:`serve.grading.config.ReviewConfig`), each named by a fixed reason code
(:data:`serve.grading.results.REVIEW_REASONS`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from serve.grading.config import ReviewConfig
from serve.grading.results import (
    REVIEW_REASONS,
    AspectScore,
    Quality,
    Review,
    ScoredAnswer,
    ScoreInterval,
    Uncertainty,
)


def unclipped_width(interval: ScoreInterval) -> float:
    """The interval's width before clipping to the scale: the same uncertainty is as wide at A1 as at B1."""
    return math.inf if interval.width_unclipped is None else interval.width_unclipped


def review_reasons(
    uncertainty: Uncertainty,
    quality: Quality,
    thresholds: ReviewConfig,
    *,
    interval: ScoreInterval | None = None,
    duration_s: float | None = None,
    score: float | None = None,
    aspects: Mapping[str, AspectScore] | None = None,
) -> list[str]:
    """The reason codes that apply, in the order of :data:`REVIEW_REASONS`."""
    t = thresholds
    d = duration_s
    a = list((aspects or {}).values())
    gap = abs(score - sum(x.score for x in a) / len(a)) if a and score is not None else 0.0
    checks = (
        ("low_snr", t.min_snr_db is not None and quality.snr_db < t.min_snr_db),
        ("clipping", t.max_clipped_fraction is not None and quality.clipped_fraction > t.max_clipped_fraction),
        ("low_speech_ratio", t.min_speech_ratio is not None and quality.speech_ratio < t.min_speech_ratio),
        ("uncertain", t.max_score_sd is not None and uncertainty.score_sd > t.max_score_sd),
        ("low_label_mass", t.min_label_mass is not None and uncertainty.label_mass < t.min_label_mass),
        ("chunks_disagree", t.max_chunk_spread is not None and uncertainty.chunk_spread > t.max_chunk_spread),
        (
            "wide_interval",
            t.max_interval_width is not None
            and interval is not None
            and unclipped_width(interval) > t.max_interval_width,
        ),
        ("too_short", t.min_duration_s is not None and d is not None and d < t.min_duration_s),
        ("too_long", t.max_duration_s is not None and d is not None and d > t.max_duration_s),
        ("cut_off", t.cut_off and quality.ends_in_speech),
        ("aspect_uncertain", t.max_score_sd is not None and any(x.uncertainty.score_sd > t.max_score_sd for x in a)),
        ("aspect_low_label_mass", t.min_label_mass is not None and any(x.label_mass < t.min_label_mass for x in a)),
        ("aspects_disagree", t.max_aspect_gap is not None and gap > t.max_aspect_gap),
    )
    return [code for code, hit in checks if hit]


def assess(answer: ScoredAnswer, quality: Quality, thresholds: ReviewConfig) -> ScoredAnswer:
    """The answer with its audio quality and its review verdict."""
    reasons = review_reasons(
        answer.uncertainty,
        quality,
        thresholds,
        interval=answer.interval,
        duration_s=answer.duration_s,
        score=answer.score,
        aspects=answer.aspects,
    )
    return answer.model_copy(update={"quality": quality, "review": Review(needed=bool(reasons), reasons=reasons)})


#: Reason of a candidate's overall review when one of their answers could not be scored (their audio).
NOT_SCORABLE = "not_scorable"
#: Reason of a candidate's overall review when the grader failed to score one of their answers (a system failure).
INCOMPLETE = "incomplete"
#: Reason of a candidate's overall review when a required part of the exam has no answer.
MISSING_PART = "missing_part"


def overall_review(reviews: list[Review], not_scorable: int, failed: int = 0) -> Review:
    """A candidate's verdict: every reason of their scored answers, ``not_scorable`` when any answer was, and
    ``incomplete`` when the grader failed to score one."""
    hit = {reason for r in reviews for reason in r.reasons}
    reasons = [code for code in REVIEW_REASONS if code in hit] + ([NOT_SCORABLE] if not_scorable else [])
    reasons += [INCOMPLETE] if failed else []
    return Review(needed=bool(reasons), reasons=reasons)
