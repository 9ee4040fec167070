"""``l2grader loadtest`` and ``l2grader bench`` end to end on the tiny checkpoint (short runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.engine

L2GRADER = str(Path(sys.executable).parent / "l2grader")


@pytest.fixture(scope="module")
def demo_cfg(tiny_config, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("loadtest")
    raw = tiny_config()
    raw["serving"] = {"registry_file": str(d / "registry.json"), "api_keys_env": "L2G_LOADTEST_KEYS"}
    (d / "demo.yaml").write_text(yaml.safe_dump(raw))
    return d / "demo.yaml"


def test_loadtest_short_run(demo_cfg, tmp_path):
    out = tmp_path / "run"
    run = subprocess.run(
        [
            L2GRADER,
            "loadtest",
            "--config",
            str(demo_cfg),
            "--users",
            "8",
            "--duration",
            "20",
            "--pool",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
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


def test_bench_prints_all_three_paths(demo_cfg, tmp_path):
    run = subprocess.run(
        [
            L2GRADER,
            "bench",
            "--config",
            str(demo_cfg),
            "--answers",
            "6",
            "--reference-answers",
            "3",
            "--warmup",
            "2",
            "--concurrency",
            "4",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    for name in ("service", "offline", "reference"):
        assert any(line.startswith(name) for line in lines), name
    result = json.loads(lines[-1])
    assert set(result["paths"]) == {"service", "offline", "reference"}
    for path in result["paths"].values():
        assert path["answers_per_s"] > 0 and path["errors"] == {}
    assert result["paths"]["service"]["answers"] == 6 and result["paths"]["reference"]["answers"] == 3
    assert result["service_extra_cpu_ms_per_answer"] is not None
    assert result["max_score_diff_service_offline"] < 1e-4  # the same answers get the same scores


def test_overload_gets_503_with_retry_after_and_does_not_fail_the_run(tiny_config, tmp_path):
    """A scorer that takes one answer at a time and queues one more: the rest are 503s, which are intended."""
    raw = tiny_config()
    raw["serving"] = {
        "registry_file": str(tmp_path / "registry.json"),
        "scorer": {"max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 2},
    }
    cfg = tmp_path / "overload.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    run = subprocess.run(
        [
            L2GRADER,
            "loadtest",
            "--config",
            str(cfg),
            "--users",
            "16",
            "--duration",
            "15",
            "--wait",
            "0",
            "--pool",
            "2",
            "--mix",
            "short:100",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(summary["errors"]) == {"503"} and summary["errors"]["503"] > 0, summary
    assert summary["answers"] > 0  # the scorer kept scoring what it admitted
    assert "Retry-After 2" in (out / "locust_failures.csv").read_text()
