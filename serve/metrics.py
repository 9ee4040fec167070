"""Prometheus metrics of the ingress (one registry per ingress replica)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The service's counters, histograms and gauges."""

    def __init__(self) -> None:
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
        self.inflight = Gauge("l2grader_inflight_requests", "Scoring requests in this ingress replica (queue depth)", registry=r)
        self.adapter_loads = Gauge(
            "l2grader_adapter_loads", "Adapter loads on the scorer replica that answered (cumulative)", ["part"], registry=r
        )
        self.adapter_evictions = Gauge(
            "l2grader_adapter_evictions", "Adapter evictions on the scorer replica that answered (cumulative)", ["part"], registry=r
        )

    def set_scorer_stats(self, stats: dict[str, dict[str, int]]) -> None:
        for part, n in stats.get("adapter_loads", {}).items():
            self.adapter_loads.labels(part).set(n)
        for part, n in stats.get("adapter_evictions", {}).items():
            self.adapter_evictions.labels(part).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
