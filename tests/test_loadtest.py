"""``l2grader loadtest`` and ``l2grader bench`` end to end on the tiny checkpoint (short runs).

Locust against an overloaded scorer (503s that do not fail the run) runs on the
fake engine, in tests/test_scorer.py.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import USER_KEY, l2grader

pytestmark = pytest.mark.engine


def test_loadtest_short_run(real_service, tmp_path):
    """Against the run's one real service (``--url``), with its API key."""
    out = tmp_path / "run"
    run = l2grader(
        "loadtest",
        "--config",
        real_service.config,
        "--url",
        real_service.url,
        "--api-key",
        USER_KEY,
        "--users",
        "8",
        "--duration",
        "20",
        "--pool",
        "3",
        "--out",
        out,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"answers_per_s", "audio_s_per_s", "p50_ms", "p95_ms", "p99_ms", "errors"} <= set(summary)
    assert summary["errors"] == {} and summary["answers_per_s"] > 0 and summary["audio_s_per_s"] > 0
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
    assert set(summary["parts"]) == {"interview", "long_turn"}  # fetched from GET /v1/parts, with the API key
    by_part = summary["by_part"]  # each part's answers and latency, adding up to the whole run's
    assert (
        set(by_part) == {"interview", "long_turn"} and sum(p["answers"] for p in by_part.values()) == summary["answers"]
    )
    assert all(p["answers"] > 0 and p["p95_ms"] > 0 for p in by_part.values())
    for name in ("locust_stats.csv", "locust_failures.csv", "locust_stats_history.csv", "report.html"):
        assert (out / name).stat().st_size > 0, name
    stats = (out / "locust_stats.csv").read_text()
    assert "/v1/score [interview]" in stats and "/v1/score [long_turn]" in stats  # split by part


def test_bench_prints_all_three_paths(real_service, tmp_path):
    """The service path on the run's one real service (its process tree's CPU counted), the offline and reference
    paths in the bench's process, on the service's config; the first two twice, alternated, reported as medians."""
    run = l2grader(
        "bench",
        "--config",
        real_service.config,
        "--url",
        real_service.url,
        "--service-pid",
        real_service.pid,
        "--api-key",
        USER_KEY,
        "--answers",
        "6",
        "--reference-answers",
        "3",
        "--warmup",
        "2",
        "--concurrency",
        "4",
        "--rounds",
        "2",
        "--out",
        tmp_path,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("round ")] == ["round 1", "round 2"]
    for name in ("service", "offline", "reference"):
        assert any(line.startswith(name) for line in lines), name
    result = json.loads(lines[-1])
    assert set(result["paths"]) == {"service", "offline", "reference"}
    for path in result["paths"].values():
        assert path["answers_per_s"] > 0 and path["errors"] == {}
    assert result["paths"]["service"]["answers"] == 6 and result["paths"]["reference"]["answers"] == 3
    assert result["service_extra_cpu_ms_per_answer"] is not None
    assert result["max_score_diff_service_offline"] < 1e-4  # the same answers get the same scores, every round
    rounds = result["rounds"]
    assert len(rounds) == 2 and all(r["service_over_offline_answers_per_s"] > 0 for r in rounds)
    for figure in ("service_over_offline_answers_per_s", "service_extra_cpu_ms_per_answer"):
        both = [r[figure] for r in rounds]
        median = result["ratios"][figure] if figure in result["ratios"] else result[figure]
        assert median == pytest.approx(sum(both) / 2, abs=1e-3), figure  # the median of two: their mean
    service_rates = [r["service_answers_per_s"] for r in rounds]
    assert result["paths"]["service"]["answers_per_s"] == pytest.approx(sum(service_rates) / 2, abs=1e-3)
