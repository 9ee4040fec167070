"""The vLLM engine's own numbers, exported through Ray's metrics API from the scorer replica that runs it.

vLLM hands its statistics to stat loggers after every engine step: requests
running and waiting, KV-cache use, adapters in use, and per request its time
to first token and prompt tokens. :class:`EngineStats` only keeps them (a few
assignments on vLLM's output loop, no Ray call there); the replica's
:meth:`EngineStats.publish` task hands them to Ray every
:data:`PUBLISH_EVERY_S`, and each node's metrics agent exports them beside
the service's own (``ray_l2grader_engine_*``, tagged with the replica).

vLLM's own ``RayPrometheusStatLogger`` exports more, but records dozens of
Ray metrics on every engine step, on the event loop that also serves the
replica's requests; this keeps that loop's share to a few assignments.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from ray.serve.metrics import Counter, Gauge, Histogram

logger = logging.getLogger("ray.serve")

#: Under Ray's 2 s report interval: Ray drops a gauge that was not set for two intervals.
PUBLISH_EVERY_S = 1.0
#: Time-to-first-token observations kept between two publications at most (the rest are counted, not timed).
MAX_PENDING_OBSERVATIONS = 10_000
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class EngineStats:
    """A vLLM stat logger (its ``StatLoggerBase`` interface) that keeps the latest numbers for :meth:`publish`."""

    def __init__(self) -> None:
        self.running = self.waiting = 0
        self.kv_cache_usage = 0.0
        self.adapters_running = self.adapters_waiting = 0
        self.ttft: list[float] = []
        self.prompt_tokens = 0
        self.finished = 0
        self.seen = False

    def factory(self, vllm_config=None, engine_index: int = 0) -> EngineStats:
        """What ``AsyncLLM(stat_loggers=[...])`` calls: this one keeper, whatever the engine index."""
        return self

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        self.seen = True
        if scheduler_stats is not None:
            self.running, self.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
            self.kv_cache_usage = scheduler_stats.kv_cache_usage
            self.adapters_running = len(scheduler_stats.running_lora_adapters)
            self.adapters_waiting = len(scheduler_stats.waiting_lora_adapters)
        if iteration_stats is not None:
            room = MAX_PENDING_OBSERVATIONS - len(self.ttft)
            self.ttft.extend(iteration_stats.time_to_first_tokens_iter[: max(room, 0)])
            self.prompt_tokens += iteration_stats.num_prompt_tokens
            self.finished += len(iteration_stats.finished_requests)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass

    async def publish(self) -> None:
        """Hand the kept numbers to Ray every :data:`PUBLISH_EVERY_S`, for as long as the replica runs."""
        m = _instruments()
        while True:
            await asyncio.sleep(PUBLISH_EVERY_S)
            if not self.seen:
                continue
            try:
                m["running"].set(self.running)
                m["waiting"].set(self.waiting)
                m["kv_cache"].set(self.kv_cache_usage)
                m["adapters_running"].set(self.adapters_running)
                m["adapters_waiting"].set(self.adapters_waiting)
                ttft, self.ttft = self.ttft, []
                for seconds in ttft:
                    m["ttft"].observe(seconds)
                prompt_tokens, self.prompt_tokens = self.prompt_tokens, 0
                finished, self.finished = self.finished, 0
                if prompt_tokens:
                    m["prompt_tokens"].inc(prompt_tokens)
                if finished:
                    m["finished"].inc(finished)
            except Exception:  # metrics never take the scorer down
                logger.exception("could not publish the engine's metrics")


@functools.cache
def _instruments() -> dict:
    """The Ray metrics, made inside the replica (where Ray Serve tags them with deployment and replica)."""
    return {
        "running": Gauge("l2grader_engine_requests_running", "Chunks the engine is scoring now"),
        "waiting": Gauge("l2grader_engine_requests_waiting", "Chunks waiting in the engine's queue"),
        "kv_cache": Gauge("l2grader_engine_kv_cache_usage", "Share of the engine's KV cache in use (0-1)"),
        "adapters_running": Gauge("l2grader_engine_lora_adapters_running", "LoRA adapters of the running chunks"),
        "adapters_waiting": Gauge("l2grader_engine_lora_adapters_waiting", "LoRA adapters of the waiting chunks"),
        "ttft": Histogram(
            "l2grader_engine_time_to_first_token_seconds",
            "Time from a chunk's arrival in the engine to its score (first output position)",
            TTFT_BUCKETS,
        ),
        "prompt_tokens": Counter("l2grader_engine_prompt_tokens", "Prompt tokens (rubric and audio) the engine read"),
        "finished": Counter("l2grader_engine_requests_finished", "Chunks the engine finished"),
    }


@functools.cache
def engine_stats() -> EngineStats:
    """This replica process's keeper (Serve runs one replica per process)."""
    return EngineStats()
