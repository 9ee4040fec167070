"""The Scorer deployment: one vLLM ``AsyncLLM`` per replica, adapters multiplexed by exam part.

Requests arrive with a multiplexed model id ``part@<adapter hash>``; Ray Serve
routes them to replicas that already hold that id, and a replica loads an
adapter on first use and keeps at most ``serving.adapters_per_replica`` of
them (least recently used goes first, and is dropped from the engine too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import numpy as np
from ray import serve

from serve.audio import SAMPLE_RATE, Chunk, split
from serve.config import PartConfig, load_config
from serve.engine import AsyncScorer
from serve.parts import PartSpec

logger = logging.getLogger("ray.serve")


class LoadedPart:
    """A part resolved and its adapter loaded on this replica; Serve calls ``__del__`` when it evicts it."""

    def __init__(self, spec: PartSpec, replica: ScorerReplica):
        self.spec, self._replica, self._gone = spec, replica, False
        self._loop = asyncio.get_running_loop()

    def __del__(self):
        if self._gone:
            return
        self._gone = True
        self._replica.stats["adapter_evictions"][self.spec.part] += 1
        try:
            fut = asyncio.run_coroutine_threadsafe(self._replica.core.unload_adapter(self.spec), self._loop)
            fut.result(timeout=30)
        except Exception:  # the engine may be shutting down; vLLM's own LRU still bounds memory
            logger.warning("could not unload adapter %s", self.spec.adapter_name)


class ScorerReplica:
    """Behaviour of a scorer replica (the deployment class adds multiplexing around it)."""

    async def __init__(self, config_path: str):
        cfg = load_config(config_path)
        self.core = AsyncScorer(cfg)
        specs = [self.core.resolve(part, pcfg) for part, pcfg in cfg.parts.items()]  # labels, adapters checked
        self._pending: dict[str, tuple[str, PartConfig]] = {}
        self.stats: dict[str, Counter] = {"adapter_loads": Counter(), "adapter_evictions": Counter()}
        await self._warm_up(specs[0])

    async def _warm_up(self, spec: PartSpec) -> None:
        """Score one full-length chunk before taking traffic, so the first caller does not pay the engine's warm-up."""
        t = np.arange(int(self.core.cfg.audio.max_chunk_s * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE
        tone = (0.05 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        started = time.perf_counter()
        await self.core.score(spec, split(tone, self.core.cfg.audio.max_chunk_s), "warm-up")
        logger.info("scorer warmed up in %.1f s", time.perf_counter() - started)

    async def _load_part(self, model_id: str) -> LoadedPart:
        part, pcfg = self._pending[model_id]
        spec = self.core.resolve(part, pcfg)
        await self.core.load_adapter(spec)
        self.stats["adapter_loads"][part] += 1
        return LoadedPart(spec, self)

    async def score(self, part: str, part_config: dict[str, Any], chunks: list[Chunk], request_id: str) -> dict:
        """Score one answer of ``part`` (its config travels with the request, keyed by the model id)."""
        model_id = serve.get_multiplexed_model_id()
        self._pending[model_id] = (part, PartConfig.model_validate(part_config))
        loaded = await self.get_part(model_id)
        result = await self.core.score(loaded.spec, chunks, request_id)
        return result.model_dump()

    async def check_part(self, part: str, part_config: dict[str, Any]) -> None:
        """Raise if the part cannot be scored by this engine (label tokens, adapter)."""
        self.core.resolve(part, PartConfig.model_validate(part_config))

    def ready(self) -> bool:
        return True

    def get_stats(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.stats.items()}

    def __del__(self):
        core = getattr(self, "core", None)
        if core is not None:
            core.shutdown()


def scorer_deployment(adapters_per_replica: int):
    """The Scorer deployment class, holding at most ``adapters_per_replica`` parts per replica."""

    @serve.deployment(name="Scorer")
    class Scorer(ScorerReplica):
        @serve.multiplexed(max_num_models_per_replica=adapters_per_replica)
        async def get_part(self, model_id: str) -> LoadedPart:
            return await self._load_part(model_id)

    return Scorer
