"""The whole deployment's metrics: every live Ray node's metrics export, merged into one Prometheus page.

Each node's Ray metrics agent exports what the replicas on that node recorded
(:mod:`serve.service.metrics`, :mod:`serve.service.engine_metrics`, Ray Serve's own). A
Prometheus that scrapes every node (KubeRay's PodMonitor) needs none of this;
``GET /metrics`` uses it so that one scrape of the service, or a person with
curl, sees the totals of all replicas on all nodes, not one replica's share.

Only the service's families are kept (:data:`EXPORTED_PREFIXES`), the merged
page is reused for :data:`CACHE_S` (a flood of ``/metrics`` calls costs one
fetch per node per second), and a node that does not answer within
:data:`FETCH_TIMEOUT_S` is left out and counted in ``l2grader_metrics_nodes``.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterable

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

#: Metric families the page keeps: the service's (its engine's among them) and Ray Serve's (replicas, queues).
EXPORTED_PREFIXES = ("ray_l2grader_", "ray_serve_")
#: Labels that are the same on every series of Ray's export, and those that name a node's address or Ray session
#: (callers of ``/metrics`` need no key: they see totals, not where the nodes are).
DROPPED_LABELS = frozenset(
    {"otel_scope_name", "otel_scope_schema_url", "otel_scope_version", "NodeAddress", "SessionName", "instance", "ip"}
)
CACHE_S = 1.0
FETCH_TIMEOUT_S = 2.0
#: Largest export read from one node (a node's whole Ray export is about 0.5-1 MB).
MAX_EXPORT_BYTES = 32 * 1024 * 1024


def node_export_urls() -> list[str]:
    """The metrics export of every live node of the Ray cluster this process belongs to."""
    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 (a node of our cluster)
        return response.read(MAX_EXPORT_BYTES).decode("utf-8", "replace")


def _family_name(line: str) -> str:
    if line.startswith("#"):
        parts = line.split(None, 3)
        return parts[2] if len(parts) > 2 and parts[1] in ("HELP", "TYPE") else ""
    return line.split("{", 1)[0].split(" ", 1)[0]


def kept_lines(text: str, prefixes: tuple[str, ...] = EXPORTED_PREFIXES) -> str:
    """The lines of an export that belong to the kept families (filtered before parsing: exports are large)."""
    return "\n".join(line for line in text.splitlines() if _family_name(line).startswith(prefixes)) + "\n"


def merge(exports: Iterable[str], prefixes: tuple[str, ...] = EXPORTED_PREFIXES) -> list[Metric]:
    """The kept families of several exports as one set: samples of the same series (name and labels) add up."""
    families: dict[str, Metric] = {}
    series: dict[str, dict[tuple, Sample]] = {}
    for text in exports:
        for family in text_string_to_metric_families(kept_lines(text, prefixes)):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            kept = series.setdefault(family.name, {})
            for s in family.samples:
                labels = {k: v for k, v in s.labels.items() if k not in DROPPED_LABELS}
                key = (s.name, tuple(sorted(labels.items())))
                before = kept[key].value if key in kept else 0.0
                kept[key] = s._replace(labels=labels, value=before + s.value)
    for name, family in families.items():
        family.samples = list(series[name].values())
    return list(families.values())


class _Collected:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def render(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(families))
    return generate_latest(registry)


class ClusterMetrics:
    """``GET /metrics`` of an ingress replica: the merged export of all nodes, fetched at most once per second."""

    def __init__(self) -> None:
        self._page = b""
        self._at = float("-inf")
        self._lock = asyncio.Lock()

    async def page(self) -> bytes:
        async with self._lock:  # concurrent scrapes share one fetch
            if time.monotonic() - self._at >= CACHE_S:
                self._page = await self._collect()
                self._at = time.monotonic()
            return self._page

    async def _collect(self) -> bytes:
        urls = await asyncio.to_thread(node_export_urls)
        results = await asyncio.gather(*(asyncio.to_thread(fetch, url) for url in urls), return_exceptions=True)
        exports = [r for r in results if isinstance(r, str)]
        families = await asyncio.to_thread(merge, exports)
        nodes = GaugeMetricFamily(
            "l2grader_metrics_nodes",
            "Ray nodes whose metrics export this page holds, or "
            "that did not answer in time (their replicas' numbers are missing)",
            labels=["state"],
        )
        nodes.add_metric(["answered"], len(exports))
        nodes.add_metric(["unreachable"], len(urls) - len(exports))
        return await asyncio.to_thread(render, [nodes, *families])
