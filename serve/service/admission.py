"""Scoring slots of an ingress replica, apart from the slots Ray Serve counts.

Serve admits ``max_ongoing_requests`` requests into a replica whatever they
are, so when answers fill them, health probes, readiness and metrics queue
behind answers. The ingress therefore asks Serve for more room than scoring
may use (:data:`CONTROL_SLOTS` more, see :mod:`serve.service.options`) and
bounds scoring itself: ``serving.ingress.max_ongoing_requests`` answers run
at once, ``max_queued_requests`` more wait, and the next gets 503 with
``Retry-After`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator

from serve.service.errors import ApiError

#: Requests beyond the scoring slots an ingress replica admits for health, readiness, metrics and admin calls.
CONTROL_SLOTS = 32


class ScoringSlots:
    """At most ``running`` scoring requests at once and ``queued`` waiting for a slot; 503 beyond."""

    def __init__(self, running: int, queued: int, retry_after_s: float):
        self.running, self.queued = running, queued
        self.busy = 0
        self.waiting = 0
        self._free = asyncio.Condition()
        self.retry = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.busy >= self.running and self.waiting >= self.queued:
            raise ApiError(
                503,
                "overloaded",
                f"{self.busy} answers are being scored and {self.waiting} wait; retry after the Retry-After delay",
                self.retry,
            )
        async with self._free:
            self.waiting += 1
            try:
                await self._free.wait_for(lambda: self.busy < self.running)
            finally:
                self.waiting -= 1
            self.busy += 1
        try:
            yield
        finally:
            async with self._free:
                self.busy -= 1
                self._free.notify()
