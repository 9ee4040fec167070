"""Prometheus metrics of an ingress replica, and the middleware that records every API request.

:class:`RequestMetrics` wraps the FastAPI app: it counts each API request by
endpoint (the route's name), part and status, times the successful ones,
counts errors by kind, tracks requests in flight, and turns an unexpected
exception into a JSON 500 so a failure answers instead of taking the replica
down. Routes only say which part a request was for (``request.state.part``).

Label values are bounded: a part label is a registered part id (or ``batch``);
anything else a client names is counted as ``unknown``, so no caller can grow
the metrics page by inventing ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.service.errors import error_response, internal_error

logger = logging.getLogger("ray.serve")

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The service's counters, histograms and gauges."""

    def __init__(self) -> None:
        #: The registered part ids (the ingress sets it to its registry's); other ids count as ``unknown``.
        self.known_parts: Callable[[], Collection[str]] = frozenset
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "l2grader_requests", "HTTP requests by endpoint, part and status code", ["endpoint", "part", "status"], registry=r
        )
        self.errors = Counter("l2grader_errors", "Refused or failed requests by kind and part", ["kind", "part"], registry=r)
        self.latency = Histogram(
            "l2grader_request_latency_seconds", "End-to-end latency of scoring requests", ["endpoint", "part"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.decode = Histogram(
            "l2grader_decode_seconds", "Audio decoding, resampling and chunking time", buckets=LATENCY_BUCKETS, registry=r
        )
        self.audio_seconds = Counter("l2grader_audio_seconds_scored", "Seconds of audio scored", ["part"], registry=r)
        self.answers = Counter("l2grader_answers_scored", "Answers scored", ["part"], registry=r)
        self.chunks = Counter("l2grader_chunks_scored", "Chunks (<= 30 s) scored", ["part"], registry=r)
        self.reviews = Counter(
            "l2grader_review_verdicts", "Answers by part and review verdict (needed: true or false)", ["part", "needed"],
            registry=r,
        )
        self.review_reasons = Counter(
            "l2grader_review_reasons", "Answers sent to review by part and reason code (REVIEW_REASONS, not_scorable)",
            ["part", "reason"], registry=r,
        )
        self.inflight = Gauge("l2grader_inflight_requests", "Scoring requests in this ingress replica (queue depth)", registry=r)
        self.adapter_loads = Gauge(
            "l2grader_adapter_loads", "Adapter loads on the scorer replica that answered (cumulative)", ["part"], registry=r
        )
        self.adapter_evictions = Gauge(
            "l2grader_adapter_evictions", "Adapter evictions on the scorer replica that answered (cumulative)", ["part"], registry=r
        )

    def part_label(self, part: str | None) -> str:
        """The label value for a request's part: a registered id, ``batch``, ``-`` (none) or ``unknown``."""
        if part is None:
            return "-"
        return part if part in FIXED_PART_LABELS or part in self.known_parts() else "unknown"

    def record_answer(self, part: str, chunks: int, duration_s: float) -> None:
        self.answers.labels(part).inc()
        self.chunks.labels(part).inc(chunks)
        self.audio_seconds.labels(part).inc(duration_s)

    def record_review(self, part: str, reasons: list[str]) -> None:
        """One answer's review verdict; ``part`` is a registered part, ``reasons`` fixed codes."""
        part = self.part_label(part)
        self.reviews.labels(part, "true" if reasons else "false").inc()
        for reason in reasons:
            self.review_reasons.labels(part, reason).inc()

    def set_scorer_stats(self, stats: dict[str, dict[str, int]]) -> None:
        for part, n in stats.get("adapter_loads", {}).items():
            self.adapter_loads.labels(self.part_label(part)).set(n)
        for part, n in stats.get("adapter_evictions", {}).items():
            self.adapter_evictions.labels(self.part_label(part)).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


#: Part label values that are not part ids.
FIXED_PART_LABELS = frozenset({"batch", "-"})

#: This replica process's metrics (Serve runs one replica per process).
METRICS = Metrics()

#: Route name -> the ``endpoint`` label its requests are counted under; health, readiness, metrics and docs are not.
ENDPOINTS = {"score": "score", "score_batch": "score_batch", "list_parts": "parts", "put_part": "put_part",
             "delete_part": "delete_part"}


class RequestMetrics:
    """Pure ASGI middleware: the one place API requests are counted, timed and turned into JSON on failure."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None):
        self.app, self.metrics = app, metrics or METRICS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        async def send_and_see(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_and_see)
        except Exception:  # an engine failure must answer, not take the replica down
            logger.exception("request failed")
            scope.setdefault("state", {})["error_kind"] = "internal"
            if not status["sent"]:
                await error_response(internal_error())(scope, receive, send_and_see)
        finally:
            self.metrics.inflight.dec()
        endpoint = ENDPOINTS.get(getattr(scope.get("route"), "name", None))
        if endpoint is None:
            return
        state = Request(scope).state
        part = self.metrics.part_label(getattr(state, "part", None))
        kind = getattr(state, "error_kind", None)
        if kind is not None:
            self.metrics.errors.labels(kind, part).inc()
        self.metrics.requests.labels(endpoint, part, str(status["code"])).inc()
        if status["code"] == 200:
            self.metrics.latency.labels(endpoint, part).observe(time.perf_counter() - started)
