"""The review verdict of a scored answer: which of its audio-quality and uncertainty signals cross the part's
thresholds (:class:`serve.grading.config.ReviewConfig`), each named by a fixed reason code
(:data:`serve.grading.results.REVIEW_REASONS`)."""

from __future__ import annotations

from serve.grading.config import ReviewConfig
from serve.grading.results import Quality, Review, ScoredAnswer, Uncertainty


def review_reasons(uncertainty: Uncertainty, quality: Quality, thresholds: ReviewConfig) -> list[str]:
    """The reason codes that apply, in the order of :data:`REVIEW_REASONS`."""
    t = thresholds
    checks = (
        ("low_snr", t.min_snr_db is not None and quality.snr_db < t.min_snr_db),
        ("clipping", t.max_clipped_fraction is not None and quality.clipped_fraction > t.max_clipped_fraction),
        ("low_speech_ratio", t.min_speech_ratio is not None and quality.speech_ratio < t.min_speech_ratio),
        ("uncertain", t.max_score_sd is not None and uncertainty.score_sd > t.max_score_sd),
        ("low_label_mass", t.min_label_mass is not None and uncertainty.label_mass < t.min_label_mass),
        ("chunks_disagree", t.max_chunk_spread is not None and uncertainty.chunk_spread > t.max_chunk_spread),
    )
    return [code for code, hit in checks if hit]


def assess(answer: ScoredAnswer, quality: Quality, thresholds: ReviewConfig) -> ScoredAnswer:
    """The answer with its audio quality and its review verdict."""
    reasons = review_reasons(answer.uncertainty, quality, thresholds)
    return answer.model_copy(update={"quality": quality, "review": Review(needed=bool(reasons), reasons=reasons)})
