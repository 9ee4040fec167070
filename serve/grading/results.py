"""Typed results of the grader, the same at every door: HTTP, batch, CLI, bulk Parquet, evaluation, the page.

Field names are the public contract. The bulk output's Arrow schema is
derived from these models (:mod:`serve.grading.arrow`), so a field added here
appears there too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

#: Why an answer goes to a human examiner (the ``review.reasons`` codes, fixed).
REVIEW_REASONS = (
    "low_snr",
    "clipping",
    "low_speech_ratio",
    "uncertain",
    "low_label_mass",
    "chunks_disagree",
    "wide_interval",
    "too_short",
    "too_long",
    "cut_off",
    "aspect_uncertain",
    "aspect_low_label_mass",
    "aspects_disagree",
)

#: What ``interval_status`` says: an interval from the adapter's own calibration, or why there is none.
INTERVAL_STATUSES = ("calibrated", "uncalibrated", "stale_calibration", "invalid_calibration")


class ChunkResult(BaseModel):
    """Score of one chunk (at most 30 s) of an answer."""

    start_s: float
    end_s: float
    score: float
    label_mass: float = Field(description="Probability the model puts on the label set at all, before renormalising.")


class ModelInfo(BaseModel):
    """Which model produced a score."""

    base: str = Field(description="Base model name: a hub id's or checkpoint folder's last part, never a path.")
    base_hash: str | None = Field(
        None, description="Hash of the local checkpoint's config and weight layout (16 hex digits); null for a hub id."
    )
    adapter: str | None = Field(description="Adapter name (part@hash), null for the base model.")
    adapter_hash: str | None = Field(description="Content hash of the adapter's weights.")
    untrained: bool = Field(False, description="True when the base model is the random tiny checkpoint.")


class Uncertainty(BaseModel):
    """How sure the model is of an answer's score."""

    score_sd: float = Field(description="Standard deviation of the score under the answer's label distribution.")
    entropy: float = Field(description="Entropy of the label distribution, normalised to [0, 1] (1: uniform).")
    label_mass: float = Field(
        description="Duration-weighted mean of the chunks' label mass (low: prompt or adapter does not fit the answer)."
    )
    chunk_spread: float = Field(description="Highest minus lowest chunk score (0 for one chunk).")


class Quality(BaseModel):
    """Audio quality of an answer, measured once on the decoded 16 kHz audio."""

    speech_s: float = Field(description="Seconds of frames louder than audio.silence_dbfs.")
    speech_ratio: float = Field(description="speech_s over the answer's duration.")
    snr_db: float = Field(
        description="Estimated signal-to-noise ratio: loudest against quietest frames, in dB (capped at 100)."
    )
    clipped_fraction: float = Field(description="Share of samples at full scale (|x| >= 0.99).")
    speech_dbfs: float = Field(description="RMS level of the speech frames, dBFS.")
    noise_dbfs: float | None = Field(
        None, description="RMS level of the frames without speech (the noise floor), dBFS; null when all is speech."
    )
    ends_in_speech: bool = Field(
        False,
        description="The recording was probably cut off mid-word: speech runs into its end, and its last 20 ms are "
        "within audio.cut_off_db of the speech level (a finished word falls towards silence first).",
    )
    speech_detector: str = Field(
        "loudness", description="What told speech from the rest: 'silero_vad' (a speech model) or 'loudness'."
    )


class ScoreInterval(BaseModel):
    """Where the human score lies, with the stated coverage, by split conformal prediction on held-out answers."""

    low: float
    high: float
    width: float = Field(description="high - low, as shown (clipped to the scale).")
    width_unclipped: float | None = Field(
        None,
        description="The width before clipping to the scale (null: unbounded, too few calibration answers); "
        "the review's wide_interval judges this one.",
    )
    coverage: float = Field(
        description="Nominal coverage: the share of answers like this one whose human score lies within [low, high]."
    )
    method: str = Field(
        description="'mondrian' (calibrated per predicted level), 'absolute' (one width for all answers) or "
        "'scaled' (width grows with score_sd): docs/trust.md."
    )
    calibrated_on: int = Field(description="Held-out answers the calibration was computed from.")


class Review(BaseModel):
    """Whether a human examiner should check the score, and why."""

    needed: bool
    reasons: list[str] = Field(description=f"Reason codes, a subset of {list(REVIEW_REASONS)}.")


class AspectScore(BaseModel):
    """The score of one analytic aspect of an answer (fluency, pronunciation, ...), read like the holistic one."""

    score: float = Field(description="Soft score: probability-weighted mean of the aspect's label scores.")
    hard_score: float = Field(description="Score of the most probable label.")
    cefr: str = Field(description="CEFR level nearest the soft score.")
    probabilities: dict[str, float] = Field(description="Label -> probability (duration-weighted over chunks).")
    label_cefr: dict[str, str] = Field(description="Label -> the CEFR level it stands for.")
    label_mass: float = Field(description="Probability the model puts on the aspect's label set at all.")
    uncertainty: Uncertainty
    adapter: str | None = Field(description="The adapter that scored it (part@hash; the part's unless it has its own).")
    validated: bool = Field(
        False,
        description="Held-out evidence shows the aspect agrees with its own human scores and adds to the holistic "
        "score in predicting them (docs/trust.md); false: read it as an echo of the holistic score.",
    )
    interval: ScoreInterval | None = Field(None, description="Calibrated interval of the aspect's human score.")
    interval_status: str = Field("uncalibrated", description=f"One of {list(INTERVAL_STATUSES)}.")


class ScoredAnswer(BaseModel):
    """The score of one answer to one exam part, with how far to trust it (made by :mod:`serve.grading.answers`)."""

    status: Literal["scored"] = "scored"
    part: str
    score: float = Field(description="Soft score: probability-weighted mean of the label scores.")
    hard_score: float = Field(description="Score of the most probable label.")
    cefr: str = Field(description="CEFR level nearest the soft score.")
    probabilities: dict[str, float] = Field(description="Label -> probability (duration-weighted over chunks).")
    label_cefr: dict[str, str] = Field(description="Label -> the CEFR level it stands for (A1 ... C2).")
    label_mass: float = Field(
        description="Probability the model puts on the label set (same as uncertainty.label_mass)."
    )
    uncertainty: Uncertainty
    quality: Quality | None = Field(None, description="Audio quality (set once the answer's audio is measured).")
    review: Review | None = Field(None, description="Review verdict (set with the quality).")
    interval: ScoreInterval | None = Field(
        None,
        description="Calibrated interval of the human score (null when the part's adapter has no valid "
        "calibration: interval_status says why).",
    )
    interval_status: str = Field("uncalibrated", description=f"One of {list(INTERVAL_STATUSES)}.")
    chunks: list[ChunkResult]
    duration_s: float
    model: ModelInfo
    aspects: dict[str, AspectScore] = Field(
        default_factory=dict, description="Aspect id -> its score, for parts with analytic aspects (else empty)."
    )


class NotScorableReason(BaseModel):
    kind: str = Field(
        description="silence, noise (sound at speech loudness without speech: buzz, hum, tones, music), empty, "
        "undecodable or unsupported_audio (as the single-answer 422)."
    )
    message: str


class NotScorable(BaseModel):
    """An answer whose audio cannot be scored: the candidate's recording (silence, noise, empty, undecodable...).
    In a batch or a session the other answers are scored."""

    status: Literal["not_scorable"] = "not_scorable"
    part: str
    response_id: str | None
    reason: NotScorableReason


class FailureReason(BaseModel):
    kind: str = Field(
        description="engine_error, internal_error or unreadable (retryable); invalid_row or unknown_part (a session's "
        "manifest row: fix the manifest)."
    )
    message: str


class FailedAnswer(BaseModel):
    """An answer the grader failed to score: a system failure, not the candidate's audio. It is never counted as
    not scorable; the candidate's result is incomplete until it is scored."""

    status: Literal["failed"] = "failed"
    part: str
    response_id: str | None
    reason: FailureReason
    retryable: bool = Field(
        description="True: the same answer may be scored again as it is (a session's next run does); false: its "
        "manifest row needs fixing first."
    )


#: Why a candidate's overall result is withheld (the ``withheld_reasons[].kind`` codes, fixed).
WITHHELD_KINDS = ("not_scorable", "missing_part", "incomplete", "nothing_counted")


class WithheldReason(BaseModel):
    """Why the overall result is withheld."""

    kind: str = Field(
        description="not_scorable (an answer's audio could not be scored and the rule withholds), missing_part (a "
        "required part has no answer and the rule withholds), incomplete (the grader failed on an answer: score it "
        "again) or nothing_counted (no answer of a counted part)."
    )
    part: str | None = Field(description="The part it concerns (null: the whole candidate).")
    message: str


class PartOverall(BaseModel):
    """One part in a candidate's result: the mean of its answers, and its weight."""

    weight: float = Field(description="Its normalised weight in the overall score (0: listed, but does not count).")
    score: float | None = Field(
        description="Mean of its answers' scores, an unscorable answer counted as the stated score where the rule "
        "says so; a missing part counted as stated is that score (null: nothing to count)."
    )
    answers: int = Field(description="The candidate's answers to it.")
    scored: int = Field(description="Of them, scored.")
    counted_as: int = Field(0, description="Answers (or the missing part, as 1) counted as the rule's stated score.")
    interval_low: float | None = Field(None, description="Mean of its answers' interval lows (stated scores as is).")
    interval_high: float | None = Field(None, description="Mean of its answers' interval highs.")


class OverallInterval(BaseModel):
    """Where the candidate's human overall score lies: the same rule applied to human scores of the same answers.

    Two sources (``method``): ``candidate_calibration``, a split-conformal interval from held-out candidates' human
    overall scores (the config's ``candidate.calibration``, while it is fresh); else ``union_bound``, the weighted
    sum of the parts' interval bounds (each part's the mean of its answers' bounds): when every answer's interval
    holds its human score, the overall interval holds the human overall score, which by the union bound happens with
    probability at least 1 - the sum of the answers' miscoverages (``coverage``)."""

    low: float
    high: float
    width: float = Field(description="high - low.")
    coverage: float = Field(
        description="union_bound: the coverage it guarantees, 1 - the sum over the counted scored answers of (1 - "
        "their interval's coverage), conservative (realised coverage is usually much higher); "
        "candidate_calibration: the nominal coverage, over candidates exchangeable with the calibration's."
    )
    method: Literal["union_bound", "candidate_calibration"] = Field(
        "union_bound", description='Where it came from (docs/trust.md, "The candidate\'s interval").'
    )
    answers: int = Field(description="The scored answers of the counted parts.")
    calibrated_on: int | None = Field(
        None, description="candidate_calibration: the held-out candidates it was calibrated on (else null)."
    )


class Overall(BaseModel):
    """A candidate's result over their answers (made by :func:`serve.grading.answers.candidate_result`), by the
    exam's stated rule (the config's ``candidate:`` section; docs/usage.md, "The candidate's result")."""

    score: float | None = Field(
        description="Weighted mean of the counted parts' scores, each part the mean of its answers (null when the "
        "result is withheld: withheld_reasons say why)."
    )
    cefr: str | None = Field(description="Level of the score by the exam's cut-score table (null when withheld).")
    withheld: bool = Field(
        False, description="True: no overall score is given (an unscorable answer, a missing or failed part)."
    )
    withheld_reasons: list[WithheldReason] = Field(default_factory=list, description="Why it is withheld.")
    interval: OverallInterval | None = Field(
        None, description="Interval of the human overall score (null: interval_status says why)."
    )
    interval_status: str = Field(
        "withheld",
        description="candidate_calibration or union_bound (given, from that source), withheld (no score), "
        "uncalibrated (no fresh candidate calibration and a counted answer has no interval) or below_coverage (the "
        "union bound's guaranteed coverage is below candidate.interval_coverage).",
    )
    candidate_calibration: str = Field(
        "uncalibrated",
        description="The candidate-level calibration's state: calibrated (it gave the interval), uncalibrated (none "
        "configured, or no file), stale_calibration (the rule or a part changed since it was fitted) or "
        "invalid_calibration; interval_detail says why.",
    )
    interval_detail: str = Field(
        "", description="Where the interval came from, or why the candidate calibration was not used."
    )
    by_part: dict[str, PartOverall] = Field(default_factory=dict, description="Part id -> how it counts.")
    rule: str = Field("", description="The rule applied, in words: weights, unscorable and missing parts, cuts.")
    scored: int = Field(description="Answers scored.")
    not_scorable: int = Field(
        description="Answers whose audio could not be scored (silence, noise, empty, undecodable...)."
    )
    failed: int = Field(
        0, description="Answers the grader failed to score (a system failure, not the candidate's audio)."
    )
    complete: bool = Field(
        True,
        description="False when an answer failed: the result is withheld (reason incomplete) and the review has "
        "the reason `incomplete`; score the failed answers again.",
    )
    review: Review = Field(
        description="Needed when any answer needs review, was not scorable (reason `not_scorable`) or failed "
        "(reason `incomplete`); the reasons of all answers."
    )
    aspects: dict[str, float] = Field(
        default_factory=dict,
        description="Aspect id -> mean of its scores over the scored answers that have it (unweighted, descriptive).",
    )
