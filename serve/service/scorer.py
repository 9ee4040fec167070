"""The Scorer deployment's replica: one engine, the parts it has loaded, multiplexed by model id.

Requests arrive with a multiplexed model id (:func:`serve.grading.parts.model_id`)
and the part version the ingress accepted the answer under; Ray Serve routes
them to replicas that already hold that id. A replica loads the adapter on
first use, after hashing its files again (content that is not the version's
is refused: 503 ``adapter_changed``), and keeps at most
``serving.adapters_per_replica`` parts (Serve drops the least recently used).
An answer accepted before its part was deleted or replaced is scored with
the version it was accepted under; an id without a part (another caller's)
is resolved against the shared part registry.

A dropped part's adapter leaves the engine only once no request of it is
still running (:class:`LoadedPart`). The engine comes from a factory, the real
one :class:`serve.engine.online.OnlineEngine`; tests give a fake one to check
multiplexing, eviction and back-pressure without vLLM.

A replica whose engine stopped (vLLM's engine process died) raises
:class:`serve.engine.contract.EngineDeadError` for every call, the ingress
answers 503 ``unavailable``, and Ray Serve's health check (:meth:`ScorerReplica.check_health`)
has the replica replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
from ray import serve

from serve.engine.contract import Engine, EngineDeadError
from serve.engine.online import OnlineEngine
from serve.grading.adapter_files import verify_content
from serve.grading.audio import SAMPLE_RATE, PreparedAnswer, split
from serve.grading.config import GraderConfig, PartConfig
from serve.grading.parts import Part, PartSpec
from serve.grading.quality import measure
from serve.grading.results import ScoredAnswer
from serve.service.engine_metrics import engine_stats
from serve.service.metrics import ScorerMetrics
from serve.service.settings import load_service_config, part_registry

logger = logging.getLogger("ray.serve")

#: Part versions carried by requests that a replica remembers (the latest ones) for loading them.
OFFERED_VERSIONS = 64
#: Configs of one model id (one adapter) whose resolved specs a loaded part keeps.
CONFIGS_PER_MODEL = 8

#: ``engine_factory(cfg)`` gives an :class:`serve.engine.contract.Engine`.
EngineFactory = Callable[[GraderConfig], Engine]


def online_engine(cfg: GraderConfig):
    """The real engine: vLLM's ``AsyncLLM`` (imported only in the replica), its statistics kept for export
    (:mod:`serve.service.engine_metrics`)."""
    return OnlineEngine(cfg, stat_loggers=[engine_stats().factory])


class LoadedPart:
    """A part resolved and its adapter loaded on this replica, with the requests using it counted.

    When the replica drops it (``retire``), it is released at once if no
    request of it is running, else when the last one finishes.
    """

    def __init__(
        self, spec: PartSpec, release: Callable[[PartSpec], Awaitable[None]], config: PartConfig | None = None
    ):
        self.spec, self._release = spec, release
        # The part's config it was resolved from -> its spec; a part re-registered with the same adapter and another
        # task, levels, aspects or interval settings keeps its model id, so its requests bring their own config.
        self.specs: dict[str, PartSpec] = {} if config is None else {config.model_dump_json(): spec}
        self.in_flight = 0
        self.retired = False
        self.released = False
        # Ray Serve awaits ``model.__del__`` when it drops a model from its cache; an
        # instance attribute, so that garbage collection does not call it too.
        self.__del__ = self.retire

    @contextlib.asynccontextmanager
    async def in_use(self) -> AsyncIterator[PartSpec]:
        self.in_flight += 1
        try:
            yield self.spec
        finally:
            self.in_flight -= 1
            if self.retired and self.in_flight == 0:
                await self._unload()

    async def retire(self) -> None:
        """The replica no longer holds this part: unload its adapter once idle."""
        if self.retired:
            return
        self.retired = True
        if self.in_flight == 0:
            await self._unload()

    async def _unload(self) -> None:
        if not self.released:
            self.released = True
            await self._release(self.spec)


class ScorerReplica:
    """Behaviour of a scorer replica (the builder adds Serve's deployment and multiplexing around it)."""

    async def __init__(self, config_path: str, engine_factory: EngineFactory = online_engine):
        cfg = load_service_config(config_path)
        self.cfg = cfg
        self.registry = part_registry(cfg, config_path)
        self.engine = engine_factory(cfg)
        self.metrics = ScorerMetrics()
        self._engine_metrics = asyncio.get_running_loop().create_task(engine_stats().publish())
        self._holders: Counter = Counter()  # adapter hash -> LoadedPart objects not yet released
        self._offered: OrderedDict[str, Part] = OrderedDict()  # model id -> part version requests carried
        specs = [self.engine.resolve(part) for part in self.registry.entries().values()]  # label tokens checked
        if specs:
            await self._warm_up(specs[0])

    async def _warm_up(self, spec: PartSpec) -> None:
        """Score one full-length chunk before taking traffic, so the first caller does not pay the engine's warm-up."""
        started = time.perf_counter()
        await self.engine.score_answer(spec, _tone_answer(self.cfg.audio.max_chunk_s), "warm-up")
        logger.info("scorer warmed up in %.1f s", time.perf_counter() - started)

    async def load_part(self, model_id: str) -> LoadedPart:
        """Load the part version a model id names, its adapters' content checked (Serve calls this on a cache miss).

        The version is the one a request carried, else the registry's (a re-read may hash: off the event loop).
        """
        part = self._offered.get(model_id) or await asyncio.to_thread(self.registry.by_model_id, model_id)
        for files in (part.adapter, *(f for _, f in part.aspect_adapters)):
            if files is not None:
                await asyncio.to_thread(verify_content, part.part, files)
        spec = self.engine.resolve(part)
        await self.engine.load_adapter(spec)
        self.metrics.adapter_loads.inc(1, {"part": spec.part})
        self._holders[spec.adapter_hash] += 1
        return LoadedPart(spec, self._release, part.config)

    async def _spec_for(self, loaded: LoadedPart, spec: PartSpec, part: Part | None) -> PartSpec:
        """The spec of the part version a request was accepted under: the loaded one, or (same adapter, another
        prompt or settings: the same model id) that version resolved once and kept beside it."""
        if part is None or not loaded.specs:
            return spec
        key = part.config.model_dump_json()
        if key not in loaded.specs:
            resolved = await asyncio.to_thread(self.engine.resolve, part)
            await self.engine.load_adapter(resolved)  # an aspect may have an adapter of its own in this version
            while len(loaded.specs) >= CONFIGS_PER_MODEL:
                loaded.specs.pop(next(iter(loaded.specs)))
            loaded.specs[key] = resolved
        return loaded.specs[key]

    async def _release(self, spec: PartSpec) -> None:
        """A dropped part is idle: unload its adapter unless another loaded part uses the same weights."""
        self.metrics.adapter_evictions.inc(1, {"part": spec.part})
        self._holders[spec.adapter_hash] -= 1
        if self._holders[spec.adapter_hash] > 0:
            return
        del self._holders[spec.adapter_hash]
        try:
            await self.engine.unload_adapter(spec)
        except Exception:  # noqa: BLE001 - the engine may be shutting down; vLLM's own LRU still bounds memory
            logger.warning("could not unload adapter %s", spec.model_id)

    async def score(self, prepared: PreparedAnswer, request_id: str, part: Part | None = None) -> ScoredAnswer:
        """Score one answer of the part version named by the request's multiplexed model id: the complete answer
        (``part``: that version, as the ingress accepted the answer under it)."""
        model_id = serve.get_multiplexed_model_id()
        if part is not None and part.model_id == model_id:
            self._offered[model_id] = part
            self._offered.move_to_end(model_id)
            while len(self._offered) > OFFERED_VERSIONS:
                self._offered.popitem(last=False)
        loaded = await self.get_part(model_id)
        async with loaded.in_use() as spec:
            spec = await self._spec_for(loaded, spec, part if part is not None and part.model_id == model_id else None)
            result = await self.engine.score_answer(spec, prepared, request_id)
        self.metrics.answers.inc(1, {"part": spec.part})
        self.metrics.chunks.inc(len(prepared.chunks), {"part": spec.part})
        return result

    async def check_part(self, part: Part) -> None:
        """A part before it is registered: ``ValueError`` unless it resolves, fits and scores a canary chunk.

        Checks its labels (single tokens), its prompt against ``max_model_len``
        and its LoRA matrices against the model, then loads the adapter and
        scores one short chunk with it; the adapter is unloaded again unless a
        loaded part shares its weights.
        """
        spec = self.engine.check(part)
        canary = _tone_answer(1.0)
        try:
            await self.engine.load_adapter(spec)
            result = await self.engine.score_answer(spec, canary, f"canary-{spec.model_id}")
        except EngineDeadError:
            raise  # not the adapter's fault: the caller answers 503 and Serve replaces this replica
        except Exception as e:  # noqa: BLE001 - whatever else fails, the canary refuses the adapter
            logger.warning("canary of part %s failed: %s", spec.model_id, e)
            raise ValueError(
                f"the adapter of part {part.part!r} did not score a test chunk ({type(e).__name__})"
            ) from None
        finally:
            if spec.adapter_hash not in self._holders:
                with contextlib.suppress(Exception):
                    await self.engine.unload_adapter(spec)
        scale = [lv.score for lv in spec.levels]
        if not min(scale) - 1e-6 <= result.score <= max(scale) + 1e-6:
            raise ValueError(f"the adapter of part {part.part!r} gave an impossible test score {result.score}")

    async def ready(self) -> bool:
        """True, or :class:`EngineDeadError` when this replica's engine stopped (the ingress's readiness ping)."""
        await self.engine.check_health()
        return True

    async def check_health(self) -> None:
        """Ray Serve's periodic health check: raises when the engine stopped (its process died), and Serve then
        replaces this replica (``health_check_period_s``, ``health_check_timeout_s``: serve/service/options.py)."""
        try:
            await self.engine.check_health()
        except EngineDeadError as e:
            logger.error("scorer replica unhealthy: %s; Ray Serve replaces it", e)
            raise

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _tone_answer(seconds: float) -> PreparedAnswer:
    """A tone of ``seconds`` (at most one chunk) as a prepared answer: warm-up and canary input."""
    t = np.arange(int(seconds * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE
    wave = (0.05 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return PreparedAnswer(split(wave, seconds), measure(wave, SAMPLE_RATE, -50.0))


def scorer_class(adapters_per_replica: int) -> type[ScorerReplica]:
    """The replica class holding at most ``adapters_per_replica`` parts (Serve's multiplexing LRU)."""

    class Scorer(ScorerReplica):
        @serve.multiplexed(max_num_models_per_replica=adapters_per_replica)
        async def get_part(self, model_id: str) -> LoadedPart:
            return await self.load_part(model_id)

    return Scorer
