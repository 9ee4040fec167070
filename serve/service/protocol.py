"""Request and response bodies of the HTTP API (``/v1``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from serve.grading.config import PartConfig
from serve.grading.results import FailedAnswer, NotScorable, Overall, Quality, Review, ScoredAnswer

#: Longest id a caller may give an answer or a candidate (they are echoed back and logged).
MAX_CLIENT_ID = 256


class ScoreRequest(BaseModel):
    """JSON body of ``POST /v1/score`` (multipart takes the same fields, with ``audio`` as a file)."""

    model_config = ConfigDict(extra="forbid")
    part: str
    audio_base64: str = Field(
        description="The answer's audio file (WAV, FLAC, OGG, MP3, WebM/Opus, MP4/M4A/AAC, ...), base64-encoded."
    )
    response_id: str | None = Field(
        None, max_length=MAX_CLIENT_ID, description="Caller's id of the answer, echoed back."
    )


class ScoreResponse(ScoredAnswer):
    """A scored answer with its audio quality, review verdict and the ids of the call."""

    quality: Quality
    review: Review
    response_id: str | None
    request_id: str
    latency_ms: float

    @classmethod
    def of(cls, answer: ScoredAnswer, response_id: str | None, request_id: str, latency_ms: float) -> ScoreResponse:
        """The answer as the response, without copying or validating its fields again."""
        return cls.model_construct(
            **dict(answer), response_id=response_id, request_id=request_id, latency_ms=latency_ms
        )


class BatchRequest(BaseModel):
    """Several answers of one candidate, each to its part."""

    model_config = ConfigDict(extra="forbid")
    answers: list[ScoreRequest] = Field(min_length=1, description="At most serving.max_batch_answers (64 by default).")
    candidate_id: str | None = Field(None, max_length=MAX_CLIENT_ID)


class BatchResponse(BaseModel):
    candidate_id: str | None
    results: list[Annotated[ScoreResponse | NotScorable | FailedAnswer, Field(discriminator="status")]]
    overall: Overall
    request_id: str
    latency_ms: float


class PartInfo(BaseModel):
    part: str
    model_id: str
    adapter: str | None
    adapter_hash: str | None
    task: str
    labels: dict[str, float]
    aspects: list[str] = Field(default_factory=list, description="Its analytic aspects, scored in every answer.")


class PartsResponse(BaseModel):
    parts: list[PartInfo]


class PutPartRequest(PartConfig):
    """Body of ``PUT /v1/parts/{part}``: the part's adapter folder (as the service sees it), prompt and levels."""


class ErrorBody(BaseModel):
    kind: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
    request_id: str


class ReadyResponse(BaseModel):
    """Body of ``GET /readyz``: 200 when a scorer answers, 503 (with the reason) while none does."""

    ready: bool
    reason: str | None = Field(None, description="Why the service is not ready, in words (503 only).")
    untrained: bool | None = Field(
        None, description="The model is the untrained demo checkpoint: its scores mean nothing (200 only)."
    )
    base_model: str | None = Field(None, description="Where the base model comes from (200, admin keys only).")
    intervals: dict[str, str] | None = Field(
        None,
        description="Registered part -> its interval status (calibrated, uncalibrated, stale_calibration, "
        "invalid_calibration), as its answers will carry it (200 only).",
    )
    interval_details: dict[str, str] | None = Field(
        None, description="Registered part -> why, in words (which fingerprint component changed; admin keys only)."
    )
