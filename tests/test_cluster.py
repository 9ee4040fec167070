"""The service on a real 2-node Ray cluster (head + worker node on this machine): routing, scaling, failover.

One cluster for the module (``loadtest.cluster.LocalCluster``), the tiny
checkpoint with six demo parts, two ingress replicas and two adapter slots per
scorer replica, and the scorer autoscaling from 1 to 2 replicas (at most one
of each per node). One Locust
run with a step ramp over six parts, skewed, drives it; during it the scorer
scales up, both replicas take answers, and one replica is killed with
``kill -9``; after it the scorer scales down. Longer runs (node loss,
zero-downtime deploy, one part against six) are in ``l2grader bench-cluster``.
"""

from __future__ import annotations

import time

import pytest
import yaml

from loadtest.mix import parse_parts
from tests.conftest import environment_and_signals_restored

# ---------------------------------------------------------------- units (no cluster)


def test_parse_parts_weights():
    assert parse_parts("a:40,b:20, c") == {"a": 40.0, "b": 20.0, "c": 1.0}
    assert parse_parts("") == {}
    for bad in ("a:x", "a:-1", "a:0,b:0"):
        with pytest.raises(ValueError):
            parse_parts(bad)


def test_demo_parts_keep_the_first_two_names():
    from adapters.tiny_model import DEMO_PARTS, demo_parts

    six = demo_parts(6)
    assert list(six)[:2] == list(DEMO_PARTS) and list(six)[2:] == ["part_3", "part_4", "part_5", "part_6"]
    assert list(demo_parts(1)) == ["interview"]
    with pytest.raises(ValueError):
        demo_parts(0)


def test_scaling_options_reach_serve_and_validate(tiny_config, tmp_path):
    """Autoscaling delays, graceful shutdown and replicas per node go into Serve's own config schema."""
    from ray.serve.schema import ServeDeploySchema

    from serve.service.options import SCORER, deployment_options, serve_config
    from serve.service.settings import load_service_config

    raw = tiny_config()
    raw["serving"]["scorer"] = {
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 2,
            "upscale_delay_s": 3,
            "downscale_delay_s": 10,
            "look_back_period_s": 15,
        },
        "graceful_shutdown_timeout_s": 120,
        "max_replicas_per_node": 1,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_service_config(path)
    scorer = deployment_options(cfg)[SCORER]
    assert scorer["graceful_shutdown_timeout_s"] == 120 and scorer["max_replicas_per_node"] == 1
    assert {
        k: scorer["autoscaling_config"][k] for k in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s")
    } == {"upscale_delay_s": 3, "downscale_delay_s": 10, "look_back_period_s": 15}
    deployments = {
        d.name: d for d in ServeDeploySchema.model_validate(serve_config(cfg, str(path))).applications[0].deployments
    }
    assert deployments[SCORER].max_replicas_per_node == 1
    # The scorer's requests go through the project's router (spread_part_at 4 by default), importable by that path.
    router = deployments[SCORER].request_router_config
    assert router["request_router_kwargs"] == {"spread_at": 4}
    from serve.runtime.ray_private import import_path_target
    from serve.service.routing import PartAffinityRouter

    assert import_path_target(router["request_router_class"]) is PartAffinityRouter
    # Unset, they are left out: Serve's defaults hold and existing serve configs do not change.
    default = deployment_options(load_service_config(_write(tmp_path / "d.yaml", tiny_config())))[SCORER]
    assert "graceful_shutdown_timeout_s" not in default and "upscale_delay_s" not in default["autoscaling_config"]
    raw = tiny_config()
    raw["serving"]["spread_part_at"] = None  # Serve's own routing
    serve_routing = deployment_options(load_service_config(_write(tmp_path / "e.yaml", raw)))[SCORER]
    assert "request_router_config" not in serve_routing


def _write(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def cluster_service(tmp_path_factory):
    import ray

    from adapters.tiny_model import make_tiny_model
    from loadtest.cluster import LocalCluster, replica_counts, serve_on
    from loadtest.cluster_bench import write_config

    d = tmp_path_factory.mktemp("cluster")
    tiny = make_tiny_model(d / "tiny", parts=6)
    # A replica takes 1-3 minutes to start here: the downscale delay must outlast a dip in load during that,
    # or the autoscaler cancels the replica it is starting (seen with 8 s).
    config = write_config(
        tiny / "demo.yaml",
        "cluster",
        scorer_min=1,
        scorer_max=2,
        adapters=2,
        target_ongoing=1,
        upscale_delay_s=2,
        downscale_delay_s=30,
        ingress_replicas=2,
    )
    # this process joins the cluster as a Ray driver: its environment and signal handlers are put back after
    with environment_and_signals_restored(), LocalCluster(config, workers=1) as cluster:
        service = serve_on(cluster, config, d / "serve.log")
        try:
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
            assert replica_counts()["Scorer"] == 1 and replica_counts()["Ingress"] == 2
            yield cluster, service, config, d
        finally:
            ray.shutdown()
            service.stop()


@pytest.mark.engine
def test_two_nodes_scale_route_and_survive_a_killed_replica(cluster_service):
    from loadtest.cluster import answers_counted
    from loadtest.cluster_bench import PARTS_MIX, Load, ReplicaTimeline, counts_now

    cluster, service, config, d = cluster_service
    assert len(cluster.nodes()) == 2
    timeline = ReplicaTimeline()
    timeline.start()
    before = counts_now(service.url)
    counted_before = answers_counted(service.url)
    # Step ramp 4 -> 8 -> 12 users over six parts; the scorer should reach 2 replicas in the first steps.
    load = Load(
        config, service.url, d / "load", users=12, duration_s=240, parts=PARTS_MIX, shape="step", steps=3, retries=10
    )
    try:
        _scale_route_and_kill(cluster, service, load, before, counted_before, timeline)
    finally:
        load.stop()
        timeline.stop()


def _scale_route_and_kill(cluster, service, load, before, counted_before, timeline):
    from loadtest.cluster import answers_counted, replica_counts, wait_for_replicas
    from loadtest.cluster_bench import METRICS_DELAY_S, counts_now, stats_delta

    scale_up_s = wait_for_replicas("Scorer", 2, 240)

    # Both replicas, one per node, take answers (each replica's counters in the cluster-wide GET /metrics);
    # adapters (2 slots, 6 parts) load and evict.
    assert len(set(cluster.replica_pids("Scorer").values())) == 2
    deadline = time.monotonic() + 120  # until both replicas have answered, adapters loaded and one evicted
    while True:
        during = {rid: row for rid, row in stats_delta(before, counts_now(service.url)).items() if row["answers"]}
        loads = sum(r["adapter_loads"] for r in during.values())
        evictions = sum(r["adapter_evictions"] for r in during.values())
        if (len(during) == 2 and loads >= 2 and evictions >= 1) or time.monotonic() > deadline:
            break
        time.sleep(1)
    print("replicas after scale-up:", during)
    assert len(during) == 2, during
    answers = sum(r["answers"] for r in during.values())
    loads_per_1000 = 1000 * loads / answers
    print(f"adapter loads per 1,000 answers: {loads_per_1000:.1f} ({loads} loads, {answers} answers)")
    assert loads >= 2 and evictions >= 1

    # kill -9 of the replica on the worker node, found among this cluster's processes only.
    pid = cluster.kill_replica("Scorer", node=cluster.workers[0])
    killed = time.monotonic()
    deadline = killed + 20
    while replica_counts().get("Scorer", 0) == 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    back_s = None  # two scorers again, if before the load ends (after it the autoscaler may want one)
    while load.proc.poll() is None and back_s is None:
        if replica_counts().get("Scorer", 0) == 2:
            back_s = time.monotonic() - killed
        time.sleep(0.5)
    load.stop()  # once the replacement is up, the rest of the load shows nothing new: end it, answers in flight finish
    result = load.result()
    load_ended = time.monotonic() - timeline.started
    print(f"killed scorer pid {pid}; two scorers again after {back_s} s; load: {result}")
    assert result["answers"] > 100
    assert result["answers_given_up"] == 0, result  # every answer scored, retried with its response_id
    assert set(result["errors"]) <= {"503", "0"}, result["errors"]  # refusals were retryable, nothing else failed
    # each refusal in the API's JSON, saying when to retry: the replica's death is "unavailable" (or "overloaded"
    # while the survivor takes all the load), never a bare 503
    assert result["refusals_without_retry_after"] == 0, result
    assert set(result["refusal_kinds"]) <= {"unavailable", "overloaded"}, result["refusal_kinds"]

    # The cluster-wide GET /metrics counts what the load generator got, whichever of the two ingress replicas answered.
    deadline = time.monotonic() + 10 * METRICS_DELAY_S  # every replica's counters reach the page
    while True:
        counted = answers_counted(service.url) - counted_before
        if abs(counted - result["answers"]) <= 0.01 * result["answers"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"answers: {result['answers']} by the load generator, {counted:.0f} in GET /metrics")
    assert abs(counted - result["answers"]) <= 0.01 * result["answers"], (counted, result["answers"])

    # Idle: the autoscaler goes back to one replica (stops the second, or the replacement it was starting).
    deadline = time.monotonic() + 240
    while replica_counts().get("Scorer", 0) != 1 or replica_counts("STARTING").get("Scorer", 0) != 0:
        assert time.monotonic() < deadline, f"no scale-down to one replica: {timeline.changes}"
        time.sleep(1)
    deadline = time.monotonic() + 30
    while not (timeline.changes and timeline.changes[-1][1:] == (1, 0)) and time.monotonic() < deadline:
        time.sleep(0.2)  # the timeline sees the last change
    changes = timeline.stop()
    print(
        f"scale-up after {scale_up_s:.1f} s; load ended at {load_ended:.0f} s; "
        f"scorer replicas over time (s, running, starting): {changes}"
    )
    assert changes[0][1] == 1 and any(running == 2 for _, running, _ in changes)
    assert changes[-1][1:] == (1, 0) and changes[-1][0] > load_ended  # scaled down after the load
