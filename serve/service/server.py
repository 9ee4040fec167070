"""``l2grader serve``: start Ray (locally unless an address is given) and run the application."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from serve.service.options import APP_NAME, RAY_SYSTEM_CONFIG


def _log(msg: str) -> None:
    print(f"l2grader: {msg}", file=sys.stderr, flush=True)


def run_server(config_path: str, host: str | None, port: int | None, address: str | None) -> int:
    """Deploy the application and block until SIGINT/SIGTERM."""
    import ray
    from ray import serve

    from serve.service.app import build_app
    from serve.grading.config import load_config
    from serve.engine.requests import configure_vllm_environment

    config_path = str(Path(config_path).resolve())
    cfg = load_config(config_path)
    host = host or cfg.serving.host
    port = port or cfg.serving.port
    configure_vllm_environment()
    if cfg.model.untrained:
        _log("WARNING: serving the tiny UNTRAINED demo checkpoint (random weights): scores mean nothing")

    if address:
        ray.init(address=address)  # its Ray settings are the cluster's (k8s: serve.service.options.ray_env() on every pod)
    else:
        # Local Ray: enough logical CPUs for every replica the config may start.
        s = cfg.serving
        need = s.ingress.num_cpus * s.ingress.autoscaling.max_replicas + s.scorer.num_cpus * s.scorer.autoscaling.max_replicas
        env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "L2GRADER_"))}
        ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 1)), include_dashboard=False,
                 runtime_env={"env_vars": env} if env else None, _system_config=RAY_SYSTEM_CONFIG)
    serve.start(http_options={"host": host, "port": port})
    _log(f"deploying {APP_NAME} from {config_path} (engine start-up can take a minute)")
    serve.run(build_app({"config": config_path}), name=APP_NAME, route_prefix="/", blocking=False)
    _log(f"listening on http://{host}:{port}  (API docs: http://{host}:{port}/docs)")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    _log("shutting down")
    serve.shutdown()
    ray.shutdown()
    return 0
