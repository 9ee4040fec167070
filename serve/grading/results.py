"""Typed results of the grader, shared by the CLI and the HTTP API (field names are the public contract)."""

from __future__ import annotations

from pydantic import BaseModel, Field

#: Why an answer goes to a human examiner (the ``review.reasons`` codes, fixed).
REVIEW_REASONS = ("low_snr", "clipping", "low_speech_ratio", "uncertain", "low_label_mass", "chunks_disagree")


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


class Review(BaseModel):
    """Whether a human examiner should check the score, and why."""

    needed: bool
    reasons: list[str] = Field(description=f"Reason codes, a subset of {list(REVIEW_REASONS)}.")


class ScoredAnswer(BaseModel):
    """The score of one answer to one exam part."""

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
    chunks: list[ChunkResult]
    duration_s: float
    model: ModelInfo
