"""Starting Ray, the same way for every command that needs it (``serve``, ``deploy``, ``score-session``).

Without an address it is always a Ray of its own (``address="local"``), never a
cluster that ``ray start`` left on the machine, with the Ray settings the
application relies on (:data:`RAY_SYSTEM_CONFIG`) and the project's and the
engine's environment variables passed to every worker. With an address it
joins that cluster, whose settings are its own (k8s: :func:`ray_env` on every pod).
"""

from __future__ import annotations

import logging
import os

#: Ray settings the application relies on, for every process of the cluster.
#: ``max_direct_call_object_size``: arguments up to this size travel inside the
#: call itself instead of through the shared-memory object store. Uploads and
#: decoded chunks are 0.5-8 MB, well over Ray's 100 KB default; through the
#: object store each answer cost a put, a raylet round trip and a fetch (about
#: 10 ms of CPU per answer on the demo service, 2-core machine). Answers longer
#: than about two minutes still go through the object store.
#: ``metrics_report_interval_ms``: how often each process hands its metrics to its node's exporter (Ray's
#: default 10 s); 2 s keeps ``/metrics`` and Prometheus within a scrape of the truth.
RAY_SYSTEM_CONFIG: dict[str, int] = {"max_direct_call_object_size": 8 * 1024 * 1024, "metrics_report_interval_ms": 2000}

#: The memory allocator of every Ray process: Ray starts its own processes with the jemalloc it ships
#: (``LD_PRELOAD``) and, by default, takes it off again for its workers; ``RAY_LD_PRELOAD_ON_WORKERS=1`` keeps
#: it on the workers too (replicas, engine processes, session actors). glibc's allocator, set up to give memory
#: back after bursts (two arenas, a fixed 256 KB mmap threshold), unmapped and faulted in every large block
#: again: ~24,000 page faults and ~50 ms of kernel time per answer across the scorer, the ingress and the engine
#: on the demo service (2 cores). jemalloc reuses freed memory; ``MALLOC_CONF`` (two arenas, pages unused for
#: a second handed back at once) returns a burst's memory within seconds. An ``LD_PRELOAD`` already set
#: (tcmalloc, say) is kept, workers included; ``RAY_LD_PRELOAD_ON_WORKERS=0`` restores Ray's default.
ALLOCATOR_ENV = {"RAY_LD_PRELOAD_ON_WORKERS": "1", "MALLOC_CONF": "narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0"}

#: Environment variables every Ray worker gets from the command that starts a local Ray.
PASSED_ENV_PREFIXES = ("VLLM_", "L2GRADER_", "RAY_SERVE_")


def ray_env() -> dict[str, str]:
    """:data:`RAY_SYSTEM_CONFIG` as the ``RAY_<name>`` variables that ``ray start`` and its workers read, and
    :data:`ALLOCATOR_ENV`."""
    return {**{f"RAY_{name}": str(value) for name, value in RAY_SYSTEM_CONFIG.items()}, **ALLOCATOR_ENV}


def quiet_ray(verbose: bool) -> None:
    """Ray's own lines in this process: errors only unless ``verbose`` (Ray Serve's and Ray Data's loggers too).

    Call again after ``serve.start``, which sets up Ray Serve's logger anew."""
    if not verbose:
        for name in ("ray", "ray.serve", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)


def start_ray(
    address: str | None, num_cpus: float = 0, object_store_memory: int | None = None, verbose: bool = False
) -> None:
    """Join the cluster at ``address``, or start a Ray of its own with at least ``num_cpus`` logical CPUs (and an
    object store of ``object_store_memory`` bytes, else Ray's default).

    Unless ``verbose``, the workers' output (replicas, engines, vLLM) stays in the Ray session's log folder
    (:func:`log_folder`) instead of being copied to this terminal, and Ray's own lines here are errors only."""
    # Imported here: the commands that never start Ray (score, serve-config, --help) must not pay for loading it.
    import ray

    from serve.runtime.ray_private import system_config_kwargs

    quiet_ray(verbose)
    level = logging.INFO if verbose else logging.ERROR
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=verbose)
        quiet_ray(verbose)
        return
    for name, value in ALLOCATOR_ENV.items():  # read by the processes ray.init starts (an operator's value wins)
        os.environ.setdefault(name, value)
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES)}
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, int(num_cpus + 1)),
        include_dashboard=False,
        object_store_memory=object_store_memory,
        runtime_env={"env_vars": env} if env else None,
        **system_config_kwargs(RAY_SYSTEM_CONFIG),
        logging_level=level,
        log_to_driver=verbose,
    )
    quiet_ray(verbose)


def log_folder() -> str | None:
    """The log folder of the Ray node this process runs on (its workers' output, ``serve/`` for the replicas)."""
    import ray

    context = ray.get_runtime_context()  # the driver's view of the node it runs on
    return os.path.join(context.get_temp_dir(), context.get_session_name(), "logs")  # Ray's documented layout
