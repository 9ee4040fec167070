"""What every engine offers its callers: the online (:mod:`serve.engine.online`) and offline
(:mod:`serve.engine.offline`) engines, and the tests' stand-in, implement :class:`Engine`.

Imports neither vLLM nor Ray: the service's ingress imports :class:`EngineDeadError` to answer 503.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from serve.grading.audio import PreparedAnswer
from serve.grading.parts import Part, PartSpec
from serve.grading.results import ScoredAnswer


class EngineDeadError(RuntimeError):
    """The engine stopped (its process died) and will score nothing more: the holder must be replaced.

    The answer that met it was not scored; it may be sent again to another engine."""


@runtime_checkable
class Engine(Protocol):
    """One loaded model that scores prepared answers of resolved parts."""

    def resolve(self, part: Part) -> PartSpec:
        """The part resolved against this engine's tokenizer (raises if a label is not one token)."""

    def check(self, part: Part) -> PartSpec:
        """``resolve``, and ``ValueError`` unless the prompt fits the context and the LoRA matrices fit the model."""

    async def load_adapter(self, spec: PartSpec) -> None:
        """Load the part's adapters (its own, its aspects') now, not on its first request."""

    async def unload_adapter(self, spec: PartSpec) -> None:
        """Drop the part's adapters."""

    async def score_answer(self, spec: PartSpec, prepared: PreparedAnswer, request_id: str) -> ScoredAnswer:
        """Score one answer (:class:`EngineDeadError` if the engine stopped before or while scoring it)."""

    async def score_batch(
        self, answers: Sequence[tuple[PartSpec, PreparedAnswer]], request_id: str
    ) -> list[ScoredAnswer]:
        """Score several answers, in order."""

    async def check_health(self) -> None:
        """:class:`EngineDeadError` if the engine stopped; returns at once otherwise."""

    def shutdown(self) -> None:
        """Stop the engine and free its memory."""
