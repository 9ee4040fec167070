"""k8s/grafana/l2grader.json: a well-formed dashboard, and the checker that compares it with a real export.

The real check (every query against the service's export) runs with the
service in tests/test_service.py; here the checker itself is tested on small
exports, so that it can fail.
"""

from __future__ import annotations

from tests.dashboard_check import exported_series, load_dashboard, problems, queries, references


def test_dashboard_is_a_grafana_dashboard_with_queries():
    dash = load_dashboard()
    assert dash["uid"] == "l2grader" and dash["title"]
    titles = [p["title"] for p in dash["panels"] if p["type"] != "row"]
    assert len(titles) == len(set(titles)) >= 20
    for p in dash["panels"]:
        assert p["type"] == "row" or p["targets"], p["title"]
    refs = [t["refId"] for p in dash["panels"] for t in p.get("targets", [])]
    assert refs and all(r.isalpha() for r in refs)
    names = set().union(*(references(expr)[0] for _, expr in queries(dash)))
    # the families the issue asks for: throughput, latency, errors, review, replicas, adapters, vLLM's engine
    for want in (
        "ray_l2grader_answers_scored_total",
        "ray_l2grader_request_latency_seconds_bucket",
        "ray_l2grader_errors_total",
        "ray_l2grader_review_verdicts_total",
        "ray_serve_deployment_replica_healthy",
        "ray_l2grader_scorer_adapter_loads_total",
        "ray_l2grader_engine_requests_waiting",
        "ray_l2grader_engine_kv_cache_usage",
        "ray_l2grader_engine_time_to_first_token_seconds_bucket",
    ):
        assert want in names, want


def test_references_reads_metrics_selectors_and_groupings():
    metrics, labels = references(
        'histogram_quantile(0.95, sum by (le, part) (rate(ray_x_seconds_bucket{application="$a",endpoint!="y"}[5m])))'
        " / sum(ray_y_total)"
    )
    assert metrics == {"ray_x_seconds_bucket", "ray_y_total"}
    assert labels == {"part", "application", "endpoint"}


EXPORT = """\
# HELP ray_l2grader_errors_total Refused or failed requests
# TYPE ray_l2grader_errors_total counter
ray_l2grader_errors_total{application="l2grader",kind="silence",part="interview"} 2.0
# HELP ray_vllm_num_requests_waiting waiting
# TYPE ray_vllm_num_requests_waiting gauge
ray_vllm_num_requests_waiting{ReplicaId="abc",engine="0"} 0.0
# HELP other_metric not kept
# TYPE other_metric gauge
other_metric 1.0
"""


def _dash(*exprs: str) -> dict:
    return {
        "panels": [
            {"type": "timeseries", "title": f"p{i}", "targets": [{"expr": e, "refId": "A"}]}
            for i, e in enumerate(exprs)
        ]
    }


def test_the_checker_finds_missing_metrics_and_labels():
    series = exported_series(EXPORT)
    assert series == {
        "ray_l2grader_errors_total": {"application", "kind", "part"},
        "ray_vllm_num_requests_waiting": {"ReplicaId", "engine"},
    }
    good = _dash(
        'sum by (kind) (rate(ray_l2grader_errors_total{application="$application"}[5m]))',
        "max by (ReplicaId) (ray_vllm_num_requests_waiting)",
    )
    assert problems(good, series) == []
    bad = _dash(
        "sum(rate(ray_l2grader_error_total[5m]))",  # misspelt metric
        "sum by (reason) (ray_l2grader_errors_total)",  # a label it does not carry
        'sum(ray_vllm_num_requests_waiting{application="x"})',  # vLLM's series have no Serve tags
        "vector(1)",
    )  # names nothing
    assert problems(bad, series) == [
        "p0: metric ray_l2grader_error_total is not exported",
        "p1: label reason is on none of ['ray_l2grader_errors_total']",
        "p2: label application is on none of ['ray_vllm_num_requests_waiting']",
        "p3: 'vector(1)' names no metric",
    ]
