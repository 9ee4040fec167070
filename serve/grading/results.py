"""Typed results of the grader, shared by the CLI and the HTTP API (field names are the public contract)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ChunkResult(BaseModel):
    """Score of one chunk (at most 30 s) of an answer."""

    start_s: float
    end_s: float
    score: float


class ModelInfo(BaseModel):
    """Which model produced a score."""

    base: str = Field(description="Base model id or path.")
    adapter: str | None = Field(description="Adapter name (part@hash), null for the base model.")
    adapter_hash: str | None = Field(description="Content hash of the adapter's weights.")
    untrained: bool = Field(False, description="True when the base model is the random tiny checkpoint.")


class ScoredAnswer(BaseModel):
    """The score of one answer to one exam part."""

    part: str
    score: float = Field(description="Soft score: probability-weighted mean of the label scores.")
    hard_score: float = Field(description="Score of the most probable label.")
    cefr: str = Field(description="CEFR level nearest the soft score.")
    probabilities: dict[str, float] = Field(description="Label -> probability (duration-weighted over chunks).")
    chunks: list[ChunkResult]
    duration_s: float
    model: ModelInfo
