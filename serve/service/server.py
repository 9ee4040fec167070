"""``l2grader serve``: start Ray (locally unless given an address) and run the application; ``deploy``: change it."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import ray
from ray import serve

from serve.engine.requests import configure_vllm_environment
from serve.grading.config import ConfigError
from serve.runtime.console import log
from serve.runtime.ray_cluster import log_folder, quiet_ray, start_ray
from serve.runtime.ray_private import ingress_targets
from serve.service.app import build_app
from serve.service.auth import ALLOW_UNAUTHENTICATED_ENV, admin_keys, api_keys, is_loopback
from serve.service.edge import EDGE_TOKEN_ENV, Edge, free_port, local_targets, replica_env
from serve.service.options import APP_NAME, ha_proxy_refusal, http_options, serve_env
from serve.service.proxy_guard import proxy_env
from serve.service.settings import ServiceConfig, load_service_config


def listen_host(cfg: ServiceConfig, host: str | None, allow_unauthenticated: bool) -> str:
    """Where to listen: keys first (:class:`ConfigError` if a named key variable is unset), loopback without any key."""
    host = host or cfg.serving.host
    keys = api_keys(cfg.serving) + admin_keys(cfg.serving)
    if keys or allow_unauthenticated or cfg.serving.allow_unauthenticated:
        if not keys:
            log(
                "WARNING: no API keys configured and unauthenticated access allowed: anyone who reaches "
                f"{host} can score and change parts"
            )
        return host
    if not is_loopback(host):
        log(
            f"no API keys configured: listening on 127.0.0.1 only, not {host} "
            "(configure serving.api_keys_env/admin_keys_env, or pass --allow-unauthenticated)"
        )
    else:
        log("no API keys configured: the API accepts clients on this machine only")
    return host if is_loopback(host) else "127.0.0.1"


def node_observability() -> tuple[str | None, str | None]:
    """This Ray node's log folder and the address of its metrics export (what Prometheus scrapes), where known."""
    logs = log_folder()
    me = ray.get_runtime_context().get_node_id()
    ports = [(n["NodeManagerAddress"], n.get("MetricsExportPort")) for n in ray.nodes() if n["NodeID"] == me]
    export = f"http://{ports[0][0]}:{ports[0][1]}/metrics" if ports and ports[0][1] else None
    return logs, export


def metrics_line(export: str | None) -> str:
    """What ``serve`` prints of its node's metrics export: the address and who can reach it.

    Ray's exporter binds to loopback only where the node's address is loopback, and to every interface
    otherwise, and Ray has no option to bind it elsewhere: on Linux a local Ray's node takes the machine's
    outward address (``ray.init``/``ray start`` turn a loopback node address into that one). So the line says
    who can read it, whatever the API's own host."""
    if export is None:
        return "metrics export of this node: none (Ray reported no metrics export port)"
    host = urlsplit(export).hostname
    if is_loopback(host):
        return f"metrics export of this node: {export} (this machine only)"
    return (
        f"metrics export of this node: {export} (open to every machine that reaches this one, without a key, "
        "like Ray's other ports, whatever host the API listens on; Ray cannot bind it to loopback: firewall "
        "Ray's ports, see docs/operating.md#metrics)"
    )


def run_app(config_path: str) -> None:
    """Deploy the application from the grader config at ``config_path`` (new, or in place of the running one)."""
    serve.run(build_app({"config": config_path}), name=APP_NAME, route_prefix="/", blocking=False)


def run_server(
    config_path: str,
    host: str | None,
    port: int | None,
    address: str | None,
    allow_unauthenticated: bool = False,
    verbose: bool = False,
) -> int:
    """Deploy the application and block until SIGINT/SIGTERM; exit 2 when a named key variable is unset or
    Ray Serve's HAProxy ingress is asked for (:func:`serve.service.options.ha_proxy_refusal`). With a Ray of its
    own and ``serving.edge`` auto or haproxy, clients reach the replicas through the edge
    (:mod:`serve.service.edge`), which the stop closes first.

    Prints the project's own lines only (Ray's, Ray Serve's and vLLM's stay in the Ray log folder it names)
    unless ``verbose``."""

    config_path = str(Path(config_path).resolve())
    cfg = load_service_config(config_path)
    try:
        host = listen_host(cfg, host, allow_unauthenticated)
    except ConfigError as e:
        log(f"error: {e}")
        return 2
    refusal = ha_proxy_refusal(os.environ)
    if refusal:
        log(f"error: {refusal}")
        return 2
    port = port or cfg.serving.port
    configure_vllm_environment()
    # Every process of the service (proxies included) sees these: the proxy guard and the keyless rule.
    os.environ.update(proxy_env(config_path))
    for name, value in serve_env(verbose).items():  # read by Serve's processes (an operator's value wins)
        os.environ.setdefault(name, value)
    if allow_unauthenticated:
        os.environ[ALLOW_UNAUTHENTICATED_ENV] = "1"
    if cfg.model.untrained:
        log("WARNING: serving the tiny UNTRAINED demo checkpoint (random weights): scores mean nothing")

    edge_plan = None
    if cfg.serving.edge == "haproxy" and address:
        log("error: serving.edge haproxy runs with a Ray of its own; on a cluster the manifests run the edge")
        return 2
    if cfg.serving.edge != "ray_proxy" and not address:
        if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
            log(
                "error: RAY_SERVE_ENABLE_HA_PROXY=1 (Ray's HAProxy) and the edge exclude each other: "
                "set serving.edge: ray_proxy to measure Ray's"
            )
            return 2
        # The replicas (and Serve's proxy, the edge's backup) listen on loopback; the edge on the public address.
        edge_plan = Edge.plan(cfg, host, port, proxy_port=free_port())
        os.environ.update(replica_env(edge_plan.token))

    # Joined: the cluster's Ray settings (k8s: serve.runtime.ray_cluster.ray_env() and proxy_env() on every pod). Local:
    # enough logical CPUs for every replica the config may start.
    s = cfg.serving
    start_ray(
        address,
        s.ingress.num_cpus * s.ingress.autoscaling.max_replicas + s.scorer.num_cpus * s.scorer.autoscaling.max_replicas,
        verbose=verbose,
    )
    if edge_plan:
        serve.start(http_options=http_options(cfg, edge_plan.proxy_host, edge_plan.proxy_port))
    else:
        serve.start(http_options=http_options(cfg, host, port))
    quiet_ray(verbose)
    log(f"deploying {APP_NAME} from {config_path} (engine start-up can take a minute)")
    run_app(config_path)
    logs, export = node_observability()
    edge = None
    if edge_plan:
        edge = Edge(cfg, edge_plan, lambda: local_targets(ingress_targets(APP_NAME)), Path(logs or ".") / "edge.log")
        if not started(edge, f"the ingress replicas (its log: {edge.log_path})"):
            stop_service(joined=False)
            return 1
    log(f"logs: {logs} (replicas: serve/, engines: worker-*; --verbose prints them here too)")
    log(metrics_line(export))
    log(f"listening on http://{host}:{port}: the page at /, API docs at /docs; Ctrl-C stops")

    wait_for_stop_signal()
    log("shutting down")
    try:
        if edge:  # no new connection; requests in flight go on to their replicas
            edge.stop_accepting()
        stop_service(joined=bool(address))
    finally:
        if edge:
            edge.stop()
    return 0


def started(edge: Edge, before: str) -> bool:
    """Start ``edge`` (in front of ``before``) and say so; False, said in one line, if it did not start."""
    try:
        edge.start()
    except (OSError, RuntimeError) as e:
        log(f"error: the edge did not start: {e}")
        edge.stop()
        return False
    log(f"edge: HAProxy on {edge.plan.host}:{edge.plan.port} in front of {before}")
    return True


def wait_for_stop_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def run_edge(config_path: str, address: str, node_ip: str, host: str, port: int, proxy_port: int) -> int:
    """The edge beside an ingress pod of a Ray cluster (Kubernetes): HAProxy on ``host:port`` in front of the ingress
    replicas that run on the node at ``node_ip`` (reached on loopback: the pod's network), Serve's proxy on
    ``proxy_port`` its backup; until SIGTERM. The cluster runs with the same :data:`EDGE_TOKEN_ENV` (exit 2 if
    unset)."""
    config_path = str(Path(config_path).resolve())
    cfg = load_service_config(config_path)
    token = os.environ.get(EDGE_TOKEN_ENV, "")
    if len(token) < 16:
        log(f"error: {EDGE_TOKEN_ENV} must hold the edge's secret (16 characters or more), as on every Ray node")
        return 2
    start_ray(address)

    plan = Edge.plan(cfg, host, port, proxy_port=proxy_port, token=token)
    log_path = Path(plan.folder.parent) / f"l2grader-edge-{port}.log"
    edge = Edge(cfg, plan, lambda: local_targets(ingress_targets(APP_NAME), node_ip), log_path)
    if not started(edge, f"the ingress replicas of node {node_ip}"):
        return 1
    wait_for_stop_signal()
    log("edge: stopping (requests in flight finish)")
    edge.stop()
    ray.shutdown()
    return 0


def stop_service(joined: bool) -> None:
    """Stop the application and Ray Serve, then leave Ray.

    A Ray of its own: ``serve.delete`` stops the application (each replica after its requests, within
    ``graceful_shutdown_timeout_s``; the engines with them) and returns once every replica is gone, then
    ``ray.shutdown`` stops the node, Serve's controller and proxies with it. Not ``serve.shutdown``: it waits
    on the controller's ``graceful_shutdown``, which never returns (the controller kills itself), and Ray
    reports that call's end as a failed task: ``(raylet) Task ServeController.graceful_shutdown failed ...
    killed by `ray.kill` `` at every stop. Joined to a cluster, which outlives this process, ``serve.shutdown``
    is still what removes Serve from it (and Ray may print that line). An error of either stays an error;
    Ray is left either way."""
    try:
        if joined:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def deploy_config(config_path: str, address: str) -> int:
    """Update the running application on the cluster at ``address`` to the config at ``config_path``, in place.

    The same ``serve.run`` under the same application name, without a
    shutdown: Serve replaces the replicas of each changed deployment a few at
    a time (an old replica stops only after its requests are done, within
    ``graceful_shutdown_timeout_s``) and leaves unchanged deployments alone.
    The config must lie at ``config_path`` on every node. Returns once the
    application runs the new config (0), 1 when no application runs there.
    """
    config_path = str(Path(config_path).resolve())
    load_service_config(config_path)
    configure_vllm_environment()
    start_ray(address)
    try:
        if APP_NAME not in serve.status().applications:
            log(f"no application {APP_NAME!r} runs on {address}: start it with `l2grader serve --address`")
            return 1
        log(f"updating {APP_NAME} on {address} to {config_path}")
        started = time.monotonic()
        run_app(config_path)
        log(f"{APP_NAME} runs the new config ({time.monotonic() - started:.1f} s)")
        return 0
    finally:
        ray.shutdown()
