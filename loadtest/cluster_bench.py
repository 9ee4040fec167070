"""``l2grader bench-cluster``: the service on a 2-node Ray cluster under load: routing, scaling, failures, updates.

One :class:`loadtest.cluster.LocalCluster` (head + worker node on this
machine), the tiny checkpoint with six demo parts, ``l2grader serve
--address`` into it, then these phases, each with Locust (``l2grader
loadtest --url``) running against the service:

1. ``locality``: two scorer replicas (one per node), fewer adapter slots per
   replica than parts, a skewed part mix; then ``one_part``, the same load on
   one part. Answers, adapter loads and evictions per replica (from each
   replica's counters), loads per 1,000 answers, p95 latency per part.
2. ``failover``: ``kill -9`` of a scorer replica under load; then, under
   load again, the worker node stopped at once and a new one added: for each,
   attempts by status, answers lost after retries (same ``response_id``),
   seconds until two scorers run again.
3. ``deploy``: ``l2grader deploy`` of a config with one more adapter slot
   per replica under load: attempts by status; then the locality load again
   with those slots.
4. ``autoscale``: ``l2grader deploy`` of an autoscaling scorer (1 to 2
   replicas), a step ramp of load, then none: the replica count over time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
from pathlib import Path

from serve.cli.common import fail
from serve.runtime.console import log

PARTS_MIX = "interview:40,long_turn:20,part_3:15,part_4:10,part_5:10,part_6:5"
DEMO_PART_COUNT = 6


def write_config(
    base: Path,
    name: str,
    *,
    scorer_min: int,
    scorer_max: int,
    adapters: int,
    target_ongoing: float = 4,
    upscale_delay_s: float = 3,
    downscale_delay_s: float = 60,
    spread_part_at: int | None = 4,
    ingress_replicas: int = 1,
) -> Path:
    """A cluster config beside the tiny checkpoint's ``demo.yaml``: scorer replicas one per node, the given bounds;
    ``ingress_replicas`` fixed ingress replicas, one per node."""
    import yaml

    cfg = yaml.safe_load(base.read_text())
    ingress = cfg["serving"].setdefault("ingress", {})
    ingress.setdefault("autoscaling", {}).update(min_replicas=ingress_replicas, max_replicas=ingress_replicas)
    ingress["max_replicas_per_node"] = 1
    cfg["engine"]["max_loras"] = adapters
    cfg["serving"]["adapters_per_replica"] = adapters
    cfg["serving"]["spread_part_at"] = spread_part_at
    cfg["serving"]["scorer"] = {
        "autoscaling": {
            "min_replicas": scorer_min,
            "max_replicas": scorer_max,
            "target_ongoing_requests": target_ongoing,
            "upscale_delay_s": upscale_delay_s,
            "downscale_delay_s": downscale_delay_s,
            "look_back_period_s": 15,
        },  # Serve wants it above its 10 s metrics interval
        "max_ongoing_requests": 32,
        "max_queued_requests": 64,
        "num_cpus": 1,
        "max_replicas_per_node": 1,
        "graceful_shutdown_timeout_s": 120,
    }
    path = base.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class Load:
    """``l2grader loadtest --url`` in the background; :meth:`result` waits for its summary."""

    def __init__(
        self,
        config: Path,
        url: str,
        out: Path,
        users: int,
        duration_s: float,
        parts: str,
        shape: str = "constant",
        steps: int = 3,
        retries: int = 8,
    ):
        from loadtest.service import l2grader_cmd

        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self._log = open(out / "loadtest.out", "w")
        self.proc = subprocess.Popen(
            [
                *l2grader_cmd(),
                "loadtest",
                "--config",
                str(config),
                "--url",
                url,
                "--out",
                str(out),
                "--users",
                str(users),
                "--duration",
                str(duration_s),
                "--mix",
                "short:1",
                "--parts",
                parts,
                "--shape",
                shape,
                "--steps",
                str(steps),
                "--retries",
                str(retries),
                "--wait",
                "0.2",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        """End the run now: no new answers; those in flight finish and count in :meth:`result`'s summary."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=180)  # in-flight answers finish (Locust's --stop-timeout, 120 s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def result(self) -> dict:
        self.proc.wait()
        self._log.close()
        lines = (self.out / "loadtest.out").read_text().strip().splitlines()
        try:
            return json.loads(lines[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"the load run left no summary; see {self.out / 'loadtest.out'}") from None


class ReplicaTimeline(threading.Thread):
    """Polls a deployment's replicas every ``every_s``; keeps each change as (seconds, running, starting)."""

    def __init__(self, deployment: str = "Scorer", every_s: float = 1.0):
        super().__init__(daemon=True)
        self.deployment, self.every_s = deployment, every_s
        self.started = time.monotonic()
        self.changes: list[tuple[float, int, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        from loadtest.cluster import replica_counts

        while not self._stop_event.is_set():
            try:
                n = replica_counts().get(self.deployment, 0)
                starting = replica_counts("STARTING").get(self.deployment, 0)
            except Exception:  # noqa: BLE001 - the controller is busy or restarting: try again
                n = None
            if n is not None and (not self.changes or self.changes[-1][1:] != (n, starting)):
                self.changes.append((round(time.monotonic() - self.started, 1), n, starting))
                log(f"{self.deployment} replicas running: {n}, starting: {starting} (t={self.changes[-1][0]:.0f} s)")
            self._stop_event.wait(self.every_s)

    def stop(self) -> list[tuple[float, int, int]]:
        self._stop_event.set()
        if self.is_alive():
            self.join()
        return self.changes


#: Seconds for every replica's counters to reach ``GET /metrics`` (Ray's 2 s report interval, the page's 1 s cache).
METRICS_DELAY_S = 5.0


def counts_now(url: str) -> dict[str, dict]:
    """Each scorer replica's counters, once what was scored so far has reached ``GET /metrics``."""
    from loadtest.cluster import scorer_counts

    time.sleep(METRICS_DELAY_S)
    return scorer_counts(url)


def stats_delta(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per replica: answers, adapter loads and evictions in a phase (by part and in total); idle replicas left out."""
    out = {}
    for rid, now in after.items():
        was = before.get(rid, {})
        row = {}
        for key in ("answers", "adapter_loads", "adapter_evictions"):
            by_part = {p: int(n - was.get(key, {}).get(p, 0)) for p, n in now.get(key, {}).items()}
            by_part = {p: n for p, n in by_part.items() if n}
            row[key] = sum(by_part.values())
            row[f"{key}_by_part"] = by_part
        if row["answers"] or row["adapter_loads"] or row["adapter_evictions"]:
            out[rid] = row
    return out


def routing_figures(load: dict, delta: dict[str, dict]) -> dict:
    """What a locality phase shows: answers and loads per replica, loads per 1,000 answers, p95 per part."""
    answers = sum(r["answers"] for r in delta.values())
    loads = sum(r["adapter_loads"] for r in delta.values())
    return {
        "answers": load["answers"],
        "answers_per_s": load["answers_per_s"],
        "p95_ms": load["p95_ms"],
        "errors": load["errors"],
        "answers_given_up": load["answers_given_up"],
        "answers_scored_by_replicas": answers,
        "adapter_loads_per_1000_answers": round(1000 * loads / answers, 1) if answers else None,
        "replicas": delta,
        "p95_ms_by_part": {p: v["p95_ms"] for p, v in load["by_part"].items()},
        "answers_by_part": {p: v["answers"] for p, v in load["by_part"].items()},
    }


def _deploy(cluster, config: Path) -> float:
    from loadtest.service import l2grader_cmd

    started = time.monotonic()
    subprocess.run([*l2grader_cmd(), "deploy", "--config", str(config), "--address", cluster.address], check=True)
    return round(time.monotonic() - started, 1)


def run_phases(args: argparse.Namespace, out: Path) -> dict:
    import ray

    from adapters.tiny_model import make_tiny_model
    from loadtest.cluster import LocalCluster, serve_on, wait_for_replicas

    tiny = out / "tiny"
    if not (tiny / "demo.yaml").exists():
        log(f"writing the tiny checkpoint with {DEMO_PART_COUNT} demo parts to {tiny}")
        make_tiny_model(tiny, parts=DEMO_PART_COUNT)
    base = tiny / "demo.yaml"
    spread = args.spread_part_at or None
    fixed = write_config(
        base, "cluster-fixed", scorer_min=2, scorer_max=2, adapters=args.adapters, spread_part_at=spread
    )
    changed = write_config(
        base, "cluster-changed", scorer_min=2, scorer_max=2, adapters=args.adapters + 1, spread_part_at=spread
    )
    scaling = write_config(
        base, "cluster-autoscale", scorer_min=1, scorer_max=2, adapters=args.adapters + 1, spread_part_at=spread
    )
    results: dict = {
        "config": {
            "parts": DEMO_PART_COUNT,
            "adapters_per_replica": args.adapters,
            "users": args.users,
            "phase_s": args.duration,
            "mix": PARTS_MIX,
            "spread_part_at": spread,
        }
    }
    d = args.duration

    t0 = time.monotonic()
    with LocalCluster(fixed, workers=1) as cluster:
        log(f"cluster up at {cluster.address} ({time.monotonic() - t0:.0f} s): head + 1 worker node")
        service = serve_on(cluster, fixed, out / "serve.log")
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        try:
            results["start_s"] = round(time.monotonic() - t0, 1)
            nodes = set(cluster.replica_pids("Scorer").values())
            log(f"service ready at {service.url} ({results['start_s']:.0f} s), scorer replicas on {len(nodes)} nodes")
            results["scorer_nodes"] = len(nodes)

            for phase, parts in (("locality", PARTS_MIX), ("one_part", "interview")):
                log(f"phase {phase}: {args.users} users for {d:g} s, parts {parts}")
                before = counts_now(service.url)
                load = Load(fixed, service.url, out / phase, args.users, d, parts).result()
                results[phase] = routing_figures(load, stats_delta(before, counts_now(service.url)))
                _print_routing(phase, results[phase])

            worker = cluster.workers[0]
            results["failover"] = {}
            for event in ("replica_killed", "node_lost"):
                log(f"phase failover, {event.replace('_', ' ')}: {args.users} users for {args.failover_s:g} s")
                load = Load(fixed, service.url, out / event, args.users, args.failover_s, PARTS_MIX)
                time.sleep(15)
                if event == "replica_killed":
                    pid = cluster.kill_replica("Scorer", node=worker)
                    log(f"killed scorer replica pid {pid} on the worker node")
                else:
                    cluster.remove_worker(worker)
                    log("stopped the worker node and all its processes; adding a new one")
                lost = time.monotonic()
                if event == "node_lost":
                    cluster.add_worker()
                back_s = wait_for_replicas_after_loss(lost, 2)
                r = load.result()
                results["failover"][event] = {
                    "s_to_two_scorers": back_s,
                    "attempts_by_status": {**r["errors"], "200": r["answers"]},
                    "retries": r["retries"],
                    "answers": r["answers"],
                    "answers_lost": r["answers_given_up"],
                    "load_s": args.failover_s,
                }
                log(f"failover, {event}: {results['failover'][event]}")

            log(f"phase deploy: adapters_per_replica {args.adapters} -> {args.adapters + 1} under load")
            load = Load(changed, service.url, out / "deploy", args.users, args.deploy_s, PARTS_MIX)
            time.sleep(10)
            deploy_s = _deploy(cluster, changed)
            deployed = load.result()
            results["deploy"] = {
                "deploy_s": deploy_s,
                "attempts_by_status": {**deployed["errors"], "200": deployed["answers"]},
                "retries": deployed["retries"],
                "answers_lost": deployed["answers_given_up"],
            }
            log(f"deploy: {results['deploy']}")
            phase = f"locality_{args.adapters + 1}_slots"
            log(f"phase {phase}: the locality load again, {args.adapters + 1} adapter slots per replica")
            before = counts_now(service.url)
            load = Load(changed, service.url, out / phase, args.users, d, PARTS_MIX).result()
            results[phase] = routing_figures(load, stats_delta(before, counts_now(service.url)))
            _print_routing(phase, results[phase])

            log("phase autoscale: scorer 1..2 replicas, step ramp of load, then idle")
            _deploy(cluster, scaling)
            wait_for_replicas("Scorer", 1, 180)
            timeline = ReplicaTimeline()
            timeline.start()
            load = Load(
                scaling, service.url, out / "autoscale", args.users * 2, args.ramp_s, PARTS_MIX, shape="step", steps=3
            ).result()
            wait_for_replicas("Scorer", 1, 180)
            changes = timeline.stop()
            results["autoscale"] = {
                "replicas_over_time": changes,
                "max_replicas_seen": max(n for _, n, _ in changes),
                "attempts_by_status": {**load["errors"], "200": load["answers"]},
                "retries": load["retries"],
                "answers_lost": load["answers_given_up"],
            }
            log(f"autoscale: {results['autoscale']}")
        finally:
            service.stop()
    results["wall_s"] = round(time.monotonic() - t0, 1)
    return results


def wait_for_replicas_after_loss(since: float, n: int, timeout_s: float = 300) -> float:
    """Seconds from ``since`` until the scorer runs ``n`` replicas again (it first drops below ``n``)."""
    from loadtest.cluster import replica_counts, wait_for_replicas

    deadline = time.monotonic() + 20
    while replica_counts().get("Scorer", 0) >= n and time.monotonic() < deadline:
        time.sleep(0.2)  # Serve notices the loss within a few seconds
    wait_for_replicas("Scorer", n, timeout_s)
    return round(time.monotonic() - since, 1)


def _print_routing(phase: str, r: dict) -> None:
    print(
        f"{phase}: {r['answers']} answers ({r['answers_per_s']:.2f}/s), p95 {r['p95_ms']:.0f} ms, "
        f"adapter loads per 1,000 answers {r['adapter_loads_per_1000_answers']}, errors {r['errors'] or 'none'}"
    )
    for rid, row in r["replicas"].items():
        print(
            f"  replica {rid}: {row['answers']} answers {row['answers_by_part']}, "
            f"{row['adapter_loads']} adapter loads, {row['adapter_evictions']} evictions"
        )
    if len(r["p95_ms_by_part"]) > 1:
        print("  p95 ms by part: " + ", ".join(f"{p} {v:.0f}" for p, v in r["p95_ms_by_part"].items()))


def cmd_bench_cluster(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/bench-cluster-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.adapters >= DEMO_PART_COUNT - 1:
        fail(f"--adapters must be under {DEMO_PART_COUNT - 1} so that parts outnumber the slots after the deploy phase")
    results = run_phases(args, out)
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0


def add_bench_cluster_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-cluster",
        help="the service on a 2-node local Ray cluster: routing, failover, zero-downtime deploy, autoscaling",
    )
    p.add_argument(
        "--out", help="folder for the tiny checkpoint, configs, logs and summary.json (default runs/bench-cluster-TIME)"
    )
    p.add_argument("--users", type=int, default=8, help="Locust users of the locality phases (default 8)")
    p.add_argument("--duration", type=float, default=60, help="seconds of each locality phase (default 60)")
    p.add_argument("--adapters", type=int, default=2, help="serving.adapters_per_replica (default 2; 6 parts)")
    p.add_argument(
        "--spread-part-at",
        type=int,
        default=4,
        help="serving.spread_part_at (default 4; 0: Ray Serve's own multiplexed routing)",
    )
    p.add_argument(
        "--failover-s",
        type=float,
        default=240,
        help="seconds of load around each failure of the failover phase (default 240)",
    )
    p.add_argument("--deploy-s", type=float, default=240, help="seconds of load in the deploy phase (default 240)")
    p.add_argument(
        "--ramp-s",
        type=float,
        default=240,
        help="seconds of the autoscale phase's step ramp; a scorer replica takes 1-3 minutes to start on "
        "a small CPU machine (default 240)",
    )
    p.set_defaults(func=cmd_bench_cluster)
