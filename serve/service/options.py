"""Deployment options of the application and its Ray Serve config, derived from the grader's YAML config.

One source of truth: ``l2grader serve`` applies :func:`deployment_options` to the
deployments it runs, and :func:`serve_config` writes the same options into the
Ray Serve config file / KubeRay ``serveConfigV2``, so a cluster runs what the
CLI runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serve.service.admission import CONTROL_SLOTS
from serve.service.settings import DeploymentConfig, ServiceConfig

#: The scorer's request router (:mod:`serve.service.routing`), by import path: options stay plain data.
ROUTER_CLASS = "serve.service.routing:PartAffinityRouter"

#: How Ray Serve runs the service's processes, on every node (``l2grader serve``'s own Ray, ``ray start``, the
#: KubeRay pods); an operator's own value wins. Each takes work off every answer; together, ``l2grader bench`` on
#: the demo service (2 cores, medians of three alternated runs): 115.8 -> 113.7 CPU ms per answer, 20.7 -> 14.0 ms
#: over the offline path, Ray's idle background 153 -> 140 CPU ms/s (``docs/benchmarks.md``).
#:
#: - user code and the handle's router on the replica's own event loop (Serve's default puts each on a thread
#:   of its own): no hand-over between threads per request. The replicas' handlers never block their loop: the
#:   decoding runs in the ingress's decode threads, the engine's input processing in vLLM's own threads;
#: - Serve's log lines in its log files only (``serve/`` in the session's log folder), not written a second
#:   time to each worker's stderr for Ray's log monitor to read again; ``--verbose``, which prints them in the
#:   terminal, keeps them on stderr;
#: - the controller's loop every 0.5 s instead of 0.1 s: a replica that died or came up is acted on within
#:   half a second (health checks run every 10 s anyway); it was the busiest of Ray's idle processes.
SERVE_RUNTIME_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}

#: Ray Serve's health check of a scorer replica (:meth:`serve.service.scorer.ScorerReplica.check_health`): it fails
#: at once when the replica's engine process died, and after 3 failures in a row (Ray's threshold, ~6 s) Serve
#: replaces the replica. The timeout is Serve's default: a replica busy scoring may answer the check late.
SCORER_HEALTH_CHECK = {"health_check_period_s": 2.0, "health_check_timeout_s": 30.0}

#: How often a stopping replica checks that its requests are done (Serve's default: 2 s).
GRACEFUL_SHUTDOWN_WAIT_LOOP_S = 0.5

APP_NAME = "l2grader"
APP_IMPORT_PATH = "serve.service.app:build_app"
INGRESS = "Ingress"
SCORER = "Scorer"


def _options(d: DeploymentConfig, log_encoding: str, extra_slots: int = 0) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": d.num_cpus}
    if d.num_gpus:
        actor["num_gpus"] = d.num_gpus
    a = d.autoscaling
    autoscaling = {
        "min_replicas": a.min_replicas,
        "initial_replicas": max(a.min_replicas, 1),
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
    }
    # Settings left unset keep Serve's defaults (and the generated KubeRay configs stay as they were).
    autoscaling.update(
        _set(
            upscale_delay_s=a.upscale_delay_s,
            downscale_delay_s=a.downscale_delay_s,
            look_back_period_s=a.look_back_period_s,
        )
    )
    return {
        "max_ongoing_requests": d.max_ongoing_requests + extra_slots,
        "max_queued_requests": d.max_queued_requests,
        # A stopping replica is checked for requests still in flight every 0.5 s (Serve's default 2 s): a stop
        # ends up to 1.5 s sooner (``l2grader serve`` under load: 10.0 -> 9.2 s from SIGTERM to exit).
        "graceful_shutdown_wait_loop_s": GRACEFUL_SHUTDOWN_WAIT_LOOP_S,
        "backpressure_config": {"status_code": 503, "retry_after_s": d.retry_after_s},
        "autoscaling_config": autoscaling,
        **_set(
            graceful_shutdown_timeout_s=d.graceful_shutdown_timeout_s, max_replicas_per_node=d.max_replicas_per_node
        ),
        "ray_actor_options": actor,
        "logging_config": {"encoding": log_encoding},
    }


def _set(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def deployment_options(cfg: ServiceConfig) -> dict[str, dict[str, Any]]:
    """Ray Serve options of each deployment, by deployment name.

    The ingress bounds its scoring requests itself (:mod:`serve.service.admission`),
    so Serve admits its queued answers and room for health and admin calls too.
    Both log in ``serving.log_encoding`` (Ray Serve's ``logging_config``). The scorer's requests are
    routed by :mod:`serve.service.routing` unless ``serving.spread_part_at`` is null; a scorer replica whose engine
    stopped fails its health check (:data:`SCORER_HEALTH_CHECK`) and is replaced.
    """
    s = cfg.serving
    scorer = {**_options(s.scorer, s.log_encoding), **SCORER_HEALTH_CHECK}
    if s.spread_part_at is not None:
        scorer["request_router_config"] = {
            "request_router_class": ROUTER_CLASS,
            "request_router_kwargs": {"spread_at": s.spread_part_at},
        }
    return {INGRESS: _options(s.ingress, s.log_encoding, s.ingress.max_queued_requests + CONTROL_SLOTS), SCORER: scorer}


def http_options(cfg: ServiceConfig, host: str, port: int) -> dict[str, Any]:
    """Ray Serve's HTTP options: where its proxies listen, and the longest a request may take (see the proxy guard)."""
    return {"host": host, "port": port, "request_timeout_s": cfg.serving.request_timeout_s}


def serve_config(cfg: ServiceConfig, config_path: str) -> dict[str, Any]:
    """A Ray Serve config (the schema of ``serve deploy`` and KubeRay's ``serveConfigV2``).

    ``config_path`` is where the grader config lies on the machines that run it.
    """
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(cfg, "0.0.0.0", cfg.serving.port),
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": APP_IMPORT_PATH,
                "args": {"config": config_path},
                "deployments": [{"name": name, **opts} for name, opts in deployment_options(cfg).items()],
            }
        ],
    }


#: Ray Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``) in place of its HTTP proxy: faster on a small
#: machine, but as Ray sets HAProxy up, every client reaches the proxy guard as HAProxy's address (the per-client
#: limits become limits on all clients together), HAProxy's own errors are not the API's JSON (its 503 a plain
#: 500) and its admin socket is open to every local user (``docs/benchmarks.md``). ``l2grader serve`` refuses it
#: unless this variable is ``1``: for measuring it, knowing what is lost.
ALLOW_HA_PROXY_ENV = "L2GRADER_ALLOW_HA_PROXY"


def ha_proxy_refusal(environ: Mapping[str, str]) -> str | None:
    """Why ``l2grader serve`` refuses the Ray Serve settings in ``environ`` (None: it does not)."""
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" or environ.get(ALLOW_HA_PROXY_ENV) == "1":
        return None
    return (
        "RAY_SERVE_ENABLE_HA_PROXY=1 puts HAProxy in place of Ray Serve's proxy, and as Ray sets it up the proxy "
        "guard's per-client limits count every client as one and HAProxy's own errors are not JSON "
        f"(docs/benchmarks.md); unset it, or set {ALLOW_HA_PROXY_ENV}=1 to run it all the same"
    )


def serve_env(verbose: bool = False) -> dict[str, str]:
    """:data:`SERVE_RUNTIME_ENV`; with ``verbose``, Serve's log lines also go to stderr (and so to the terminal)."""
    return {**SERVE_RUNTIME_ENV, **({"RAY_SERVE_LOG_TO_STDERR": "1"} if verbose else {})}
