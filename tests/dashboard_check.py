"""Checks the Grafana dashboard's PromQL against a Prometheus export: every metric and label it names must exist.

A query names metrics (``ray_...``: everything the service, Ray Serve and
vLLM export through Ray carries Ray's prefix) and labels (in selectors and in
``by (...)``); a panel over a metric or label that no export holds shows
nothing, which Grafana does not report as an error.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parent.parent / "k8s" / "grafana" / "l2grader.json"

_METRIC = re.compile(r"\bray_[A-Za-z0-9_]+")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
#: Labels PromQL makes itself or that histograms always have.
_IMPLICIT_LABELS = frozenset({"le"})


def load_dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return out


def references(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names (selectors and groupings) a PromQL expression uses."""
    metrics = set(_METRIC.findall(expr))
    labels = {m for m in _MATCHER.findall(expr)}
    for group in _BY.findall(expr):
        labels |= {name.strip() for name in group.split(",") if name.strip()}
    return metrics, labels - _IMPLICIT_LABELS


def exported_series(text: str) -> dict[str, set[str]]:
    """Sample name -> the label names its series carry, from Prometheus text (``ray_`` families only)."""
    kept = "\n".join(line for line in text.splitlines() if line.startswith(("ray_", "# HELP ray_", "# TYPE ray_")))
    labels: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(kept + "\n"):
        for sample in family.samples:
            labels[sample.name] |= set(sample.labels)
    return dict(labels)


def problems(dashboard: dict, series: dict[str, set[str]]) -> list[str]:
    """What the dashboard names that the export does not hold (empty when every query can show data)."""
    found = []
    for title, expr in queries(dashboard):
        metrics, labels = references(expr)
        if not metrics:
            found.append(f"{title}: {expr!r} names no metric")
        missing = sorted(m for m in metrics if m not in series)
        found += [f"{title}: metric {m} is not exported" for m in missing]
        have = set().union(*(series.get(m, set()) for m in metrics))
        found += [f"{title}: label {lb} is on none of {sorted(metrics)}" for lb in sorted(labels - have) if not missing]
    return found
