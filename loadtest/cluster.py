"""A multi-node Ray cluster on this one machine, the service deployed into it, and what runs where.

:class:`LocalCluster` wraps Ray's ``ray.cluster_utils.Cluster``: a head node
and worker nodes, each a Ray node of its own (its own raylet, object store and
resources), started with the environment every node of the service needs (the
proxy guard's variables, the Ray settings of
:data:`serve.runtime.ray_cluster.RAY_SYSTEM_CONFIG`). ``l2grader serve --address``
then deploys the application into it as into any cluster.

Processes are found from this cluster's own raylets only (their process trees),
never by name across the machine, which other clusters may share.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from loadtest.service import Service

#: Ray Serve names a replica's worker process after its application and deployment.
REPLICA_TITLE = "ray::ServeReplica:{app}:{deployment}"


class LocalCluster:
    """A head node and ``workers`` worker nodes on this machine, ``num_cpus`` logical CPUs each.

    The head holds Ray's control plane and Serve's controller and, like the
    workers, takes replicas. Use as a context manager, or call :meth:`shutdown`.
    """

    def __init__(self, config_path: str | Path, workers: int = 1, num_cpus: float = 3, object_store_mb: int = 256):
        from ray.cluster_utils import Cluster

        from serve.engine.requests import configure_vllm_environment
        from serve.runtime.ray_cluster import ray_env
        from serve.service.options import serve_env
        from serve.service.proxy_guard import proxy_env

        # Every node started below inherits this process's environment.
        os.environ.update(
            {"RAY_AUTH_MODE": "disabled", **ray_env(), **serve_env(), **proxy_env(str(Path(config_path).resolve()))}
        )
        configure_vllm_environment()
        self.node_args = {"num_cpus": num_cpus, "object_store_memory": object_store_mb * 1024 * 1024}
        self.cluster = Cluster(initialize_head=True, head_node_args={**self.node_args, "include_dashboard": False})
        self.workers = []
        try:
            for _ in range(workers):
                self.add_worker()
        except BaseException:
            self.shutdown()
            raise

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def head(self):
        return self.cluster.head_node

    def nodes(self) -> list:
        return [self.head, *self.workers]

    def add_worker(self):
        """Start one more worker node and wait until the cluster sees it."""
        node = self.cluster.add_node(**self.node_args)
        self.cluster.wait_for_nodes()
        self.workers.append(node)
        return node

    def remove_worker(self, node) -> None:
        """Stop a worker node at once, all its processes (as when a machine is lost)."""
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def node_pids(self, node) -> list[int]:
        """Every process of one node: its raylet and all it started (workers, replicas, engine processes)."""
        import psutil

        out = []
        for infos in node.all_processes.values():
            for info in infos:
                try:
                    root = psutil.Process(info.process.pid)
                    out += [root.pid, *(c.pid for c in root.children(recursive=True))]
                except psutil.NoSuchProcess:
                    continue
        return out

    def replica_pids(self, deployment: str, app: str = "l2grader") -> dict[int, str]:
        """pid -> node id of each live replica process of ``deployment``, found in this cluster's nodes only."""
        import psutil

        title = REPLICA_TITLE.format(app=app, deployment=deployment)
        out = {}
        for node in self.nodes():
            for pid in self.node_pids(node):
                try:
                    if psutil.Process(pid).cmdline()[:1] and psutil.Process(pid).cmdline()[0].startswith(title):
                        out[pid] = node.node_id
                except psutil.NoSuchProcess:
                    continue
        return out

    def kill_replica(self, deployment: str, node=None) -> int:
        """``kill -9`` one replica process of ``deployment`` (on ``node`` if given); its pid."""
        pids = self.replica_pids(deployment)
        pid = next(p for p, n in pids.items() if node is None or n == node.node_id)
        os.kill(pid, signal.SIGKILL)
        return pid

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # Ray refuses to stop the head under a connected driver
        self.cluster.shutdown()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def replica_counts(state: str = "RUNNING", app: str = "l2grader") -> dict[str, int]:
    """Replicas in ``state`` (RUNNING, STARTING, STOPPING, ...) of each deployment of ``app`` (needs ``ray.init``)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {name: d.replica_states.get(state, 0) for name, d in status.deployments.items()}


def wait_for_replicas(deployment: str, n: int, timeout_s: float, app: str = "l2grader") -> float:
    """Seconds until ``deployment`` has ``n`` RUNNING replicas; ``TimeoutError`` after ``timeout_s``."""
    started = time.monotonic()
    while replica_counts(app=app).get(deployment, 0) != n:
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(
                f"{deployment} did not reach {n} running replicas within {timeout_s:.0f} s "
                f"(now {replica_counts(app=app)})"
            )
        time.sleep(0.5)
    return time.monotonic() - started


#: Each scorer replica's counters in the service's ``GET /metrics`` (the whole cluster's, merged), by key.
SCORER_SERIES = {
    "answers": "ray_l2grader_scorer_answers_total",
    "adapter_loads": "ray_l2grader_scorer_adapter_loads_total",
    "adapter_evictions": "ray_l2grader_scorer_adapter_evictions_total",
}


def metrics_page(url: str, headers: dict[str, str] | None = None) -> list:
    """The metric families of the service's ``GET /metrics`` (the whole cluster's, merged)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(urllib.request.Request(f"{url}/metrics", headers=headers or {}), timeout=30) as r:  # noqa: S310 - loopback http URLs built here
        return list(text_string_to_metric_families(r.read().decode()))


def scorer_counts(url: str, headers: dict[str, str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Replica -> key of :data:`SCORER_SERIES` -> part -> count, read from the service's ``GET /metrics``."""
    names = {name: key for key, name in SCORER_SERIES.items()}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for family in metrics_page(url, headers):
        for sample in family.samples:
            key = names.get(sample.name)
            if key is None:
                continue
            row = out.setdefault(sample.labels.get("replica", ""), {k: {} for k in SCORER_SERIES})
            part = sample.labels.get("part", "")
            row[key][part] = row[key].get(part, 0) + sample.value
    return out


def answers_counted(url: str, headers: dict[str, str] | None = None) -> float:
    """Answers the ingress replicas counted as scored (``ray_l2grader_answers_scored_total``, all replicas, parts)."""
    return sum(
        s.value
        for family in metrics_page(url, headers)
        for s in family.samples
        if s.name == "ray_l2grader_answers_scored_total"
    )


def serve_on(cluster: LocalCluster, config: str | Path, log_path: Path, env: dict[str, str] | None = None) -> Service:
    """``l2grader serve --address`` into ``cluster`` on a free loopback port, ready."""
    return Service(config, log_path, env=env, address=cluster.address)
