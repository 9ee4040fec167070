"""The service's metrics, recorded through Ray's metrics API, and the middleware that records every API request.

Every replica records into Ray Serve's metrics (:mod:`ray.serve.metrics`, which
tags each series with its deployment, replica and application); each node's
Ray metrics agent exports what its replicas recorded, with the prefix ``ray_``
(``ray_l2grader_requests_total``), where Prometheus or KubeRay's PodMonitor
scrapes it. Totals are therefore right with any number of replicas and nodes;
``GET /metrics`` answers the whole cluster's export
(:mod:`serve.service.cluster_metrics`).

:class:`RequestMetrics` wraps the FastAPI app: it counts each API request by
endpoint (the route's name), part and status, times the successful ones,
logs it (one line with its request id, part, status and latency as fields),
counts errors by kind, tracks requests in flight, and turns an unexpected
exception into a JSON 500 so a failure answers instead of taking the replica
down. Routes only say which part a request was for (``request.state.part``).

Label values are bounded: a part label is a registered part id (or ``batch``);
anything else a client names is counted as ``unknown``, so no caller can grow
the metrics by inventing ids.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping

from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.service.errors import error_response, internal_error, request_id

logger = logging.getLogger("ray.serve")

#: How often gauges are set again when nothing changes them (Ray's report interval is 2 s).
GAUGE_REFRESH_S = 1.0
INTERVAL_WIDTH_BUCKETS = [0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5]
LATENCY_BUCKETS = [0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
#: Half-point steps over the default label scale (A..F = 1..6); a part with another scale still counts and sums right.
SCORE_BUCKETS = [1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6]


class Metrics:
    """An ingress replica's counters, histograms and gauges."""

    def __init__(self) -> None:
        #: The registered part ids (the ingress sets it to its registry's); other ids count as ``unknown``.
        self.known_parts: Callable[[], Collection[str]] = frozenset
        self.requests = Counter(
            "l2grader_requests", "HTTP requests by endpoint, part and status code", ("endpoint", "part", "status")
        )
        self.errors = Counter("l2grader_errors", "Refused or failed requests by kind and part", ("kind", "part"))
        self.latency = Histogram(
            "l2grader_request_latency_seconds",
            "End-to-end latency of successful API requests",
            LATENCY_BUCKETS,
            ("endpoint", "part"),
        )
        self.decode = Histogram(
            "l2grader_decode_seconds", "Audio decoding, resampling and chunking time", LATENCY_BUCKETS
        )
        self.audio_seconds = Counter("l2grader_audio_seconds_scored", "Seconds of audio scored", ("part",))
        self.answers = Counter("l2grader_answers_scored", "Answers scored", ("part",))
        self.chunks = Counter("l2grader_chunks_scored", "Chunks (<= 30 s) scored", ("part",))
        self.reviews = Counter(
            "l2grader_review_verdicts", "Answers by part and review verdict (needed: true or false)", ("part", "needed")
        )
        self.review_reasons = Counter(
            "l2grader_review_reasons",
            "Answers sent to review by part and reason code (REVIEW_REASONS, not_scorable)",
            ("part", "reason"),
        )
        self.intervals = Counter(
            "l2grader_intervals",
            "Answers by part and interval status (calibrated, uncalibrated, stale_calibration, invalid_calibration)",
            ("part", "status"),
        )
        self.interval_width = Histogram(
            "l2grader_interval_width",
            "Width of the calibrated score interval, in score points",
            INTERVAL_WIDTH_BUCKETS,
            ("part",),
        )
        self.aspect_score = Histogram(
            "l2grader_aspect_score",
            "Analytic aspect scores of scored answers, by part and aspect (the part's own aspect ids, at most 8)",
            SCORE_BUCKETS,
            ("part", "aspect"),
        )
        self._inflight = 0
        self.inflight = Gauge("l2grader_inflight_requests", "API requests in this ingress replica (queue depth)")
        self.inflight.set(0)
        # Ray's exporter drops a gauge that was not set for two report intervals: re-set it while idle too.
        threading.Thread(target=self._refresh_gauges, name="metrics-refresh", daemon=True).start()

    def part_label(self, part: str | None) -> str:
        """The label value for a request's part: a registered id, ``batch``, ``-`` (none) or ``unknown``."""
        if part is None:
            return "-"
        return part if part in FIXED_PART_LABELS or part in self.known_parts() else "unknown"

    def record_answer(self, part: str, chunks: int, duration_s: float) -> None:
        tags = {"part": self.part_label(part)}
        self.answers.inc(1, tags)
        self.chunks.inc(chunks, tags)
        self.audio_seconds.inc(duration_s, tags)

    def record_aspects(self, part: str, scores: Mapping[str, float]) -> None:
        """One answer's aspect scores (aspect id -> score); the ids are the registered part's config keys."""
        part = self.part_label(part)
        for aspect, score in scores.items():
            self.aspect_score.observe(score, {"part": part, "aspect": aspect})

    def record_review(self, part: str, reasons: list[str]) -> None:
        """One answer's review verdict; ``part`` is a registered part, ``reasons`` fixed codes."""
        part = self.part_label(part)
        self.reviews.inc(1, {"part": part, "needed": "true" if reasons else "false"})
        for reason in reasons:
            self.review_reasons.inc(1, {"part": part, "reason": reason})

    def record_interval(self, part: str, status: str, width: float | None) -> None:
        """One answer's interval: its status, and its width when it has one."""
        part = self.part_label(part)
        self.intervals.inc(1, {"part": part, "status": status})
        if width is not None:
            self.interval_width.observe(width, {"part": part})

    def add_inflight(self, n: int) -> None:
        self._inflight += n
        self.inflight.set(self._inflight)

    def _refresh_gauges(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            self.inflight.set(self._inflight)


class ScorerMetrics:
    """A scorer replica's counters: what it scored and which adapters it loaded and dropped, by part."""

    def __init__(self) -> None:
        self.answers = Counter("l2grader_scorer_answers", "Answers scored by this scorer replica", ("part",))
        self.chunks = Counter("l2grader_scorer_chunks", "Chunks scored by this scorer replica", ("part",))
        self.adapter_loads = Counter(
            "l2grader_scorer_adapter_loads",
            "Adapter loads on a scorer replica (a part's first request there, or after its eviction)",
            ("part",),
        )
        self.adapter_evictions = Counter(
            "l2grader_scorer_adapter_evictions",
            "Parts a scorer replica dropped to make room (least recently used)",
            ("part",),
        )


#: Part label values that are not part ids.
FIXED_PART_LABELS = frozenset({"batch", "-"})


@functools.cache
def ingress_metrics() -> Metrics:
    """This replica process's metrics (Serve runs one replica per process), made on first use inside the replica,
    where Ray Serve's context gives them their deployment, replica and application tags."""
    return Metrics()


#: Route name -> the ``endpoint`` label its requests are counted under; health, readiness, metrics and docs are not.
ENDPOINTS = {
    "score": "score",
    "score_json": "score",
    "score_batch": "score_batch",
    "list_parts": "parts",
    "put_part": "put_part",
    "delete_part": "delete_part",
}


class RequestMetrics:
    """Pure ASGI middleware: the one place API requests are counted, timed and turned into JSON on failure."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None):
        self.app, self._metrics = app, metrics

    @property
    def metrics(self) -> Metrics:
        return self._metrics or ingress_metrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        async def send_and_see(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        self.metrics.add_inflight(1)
        try:
            await self.app(scope, receive, send_and_see)
        except Exception:  # an engine failure must answer, not take the replica down
            logger.exception("request failed")
            scope.setdefault("state", {})["error_kind"] = "internal"
            if not status["sent"]:
                await error_response(internal_error())(scope, receive, send_and_see)
        finally:
            self.metrics.add_inflight(-1)
        endpoint = ENDPOINTS.get(getattr(scope.get("route"), "name", None))
        if endpoint is None:
            return
        latency_s = time.perf_counter() - started
        state = Request(scope).state
        part = self.metrics.part_label(getattr(state, "part", None))
        kind = getattr(state, "error_kind", None)
        if kind is not None:
            self.metrics.errors.inc(1, {"kind": kind, "part": part})
        self.metrics.requests.inc(1, {"endpoint": endpoint, "part": part, "status": str(status["code"])})
        if status["code"] == 200:
            self.metrics.latency.observe(latency_s, {"endpoint": endpoint, "part": part})
        log_request(endpoint, part, status["code"], latency_s, kind)


def log_request(endpoint: str, part: str, status: int, latency_s: float, error_kind: str | None) -> None:
    """One log line per API request; its fields become JSON fields with ``serving.log_encoding: JSON``."""
    latency_ms = round(latency_s * 1000, 1)
    logger.info(
        "%s %s %d %.1fms",
        endpoint,
        part,
        status,
        latency_ms,
        extra={
            "request_id": request_id(),
            "endpoint": endpoint,
            "part": part,
            "status": status,
            "latency_ms": latency_ms,
            "error_kind": error_kind,
        },
    )
