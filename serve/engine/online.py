"""Online scoring with vLLM's ``AsyncLLM``: concurrent answers share continuous batches.

A scorer replica of the service holds one :class:`OnlineEngine`; the part's
adapter is named by its model id, loaded ahead of its first request and
removed when the replica drops the part. The engine's own statistics (queue,
running requests, KV-cache use, time to first token, ...) go to the stat
loggers the caller gives (the service passes vLLM's Ray metrics logger).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from serve.engine.contract import EngineDeadError
from serve.engine.requests import (
    RESENDS,
    Target,
    adapters_of,
    check_part,
    chunk_score,
    configure_vllm_environment,
    engine_input,
    engine_kwargs,
    lora_request,
    needs_resend,
    sampling_params,
    target_name,
)
from serve.grading.answers import answer_result, score_targets
from serve.grading.audio import Chunk, PreparedAnswer
from serve.grading.config import GraderConfig
from serve.grading.parts import Part, PartSpec, base_name, resolve_part
from serve.grading.results import ScoredAnswer
from serve.grading.scoring import ChunkScore


def served_model_name(cfg: GraderConfig) -> str:
    """The name the engine reports its model under: the hub id's or folder's last part (``Qwen2-Audio-7B-Instruct``)."""
    return base_name(cfg.model.base)


class OnlineEngine:
    """One ``AsyncLLM`` (an :class:`serve.engine.contract.Engine`); answers are scored as they come, all chunks of
    an answer at once. Its engine core runs in a process of its own: when that process dies, every call raises
    :class:`EngineDeadError`."""

    def __init__(self, cfg: GraderConfig, stat_loggers: Sequence | None = None):
        """``stat_loggers``: vLLM stat logger factories (classes) fed with the engine's statistics."""
        configure_vllm_environment()
        from vllm import AsyncEngineArgs  # after configure_vllm_environment: vLLM reads its environment at import
        from vllm.v1.engine.async_llm import AsyncLLM

        self.cfg = cfg
        # The metrics' model_name label: the model's name, not where it lies (callers without an admin key see metrics).
        args = AsyncEngineArgs(**engine_kwargs(cfg), disable_log_stats=False, served_model_name=served_model_name(cfg))
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=list(stat_loggers or []))
        self.tokenizer = self.engine.get_tokenizer()

    def resolve(self, part: Part) -> PartSpec:
        """A checked part resolved against this engine's tokenizer (raises if a label is not one token)."""
        return resolve_part(part, self.tokenizer, self.cfg)

    def check(self, part: Part) -> PartSpec:
        """``resolve``, and ``ValueError`` unless the prompt fits the context and the LoRA matrices fit the model."""
        return check_part(part, self.tokenizer, self.cfg, self.engine.model_config.hf_config)

    async def load_adapter(self, spec: PartSpec) -> None:
        """Load the part's adapters (its own, its aspects') into the engine now (not on the first request)."""
        async with self._dead_as_ours():
            for target in adapters_of(spec):
                await self.engine.add_lora(lora_request(target))

    async def unload_adapter(self, spec: PartSpec) -> None:
        """Drop the part's adapters from the engine."""
        async with self._dead_as_ours():
            for target in adapters_of(spec):
                await self.engine.remove_lora(target.adapter_int_id)

    async def check_health(self) -> None:
        """:class:`EngineDeadError` if vLLM's engine process died (``AsyncLLM.check_health``)."""
        async with self._dead_as_ours():
            await self.engine.check_health()

    @contextlib.asynccontextmanager
    async def _dead_as_ours(self) -> AsyncIterator[None]:
        """Whatever a call raises once the engine is dead (vLLM's EngineDeadError, a closed socket, ...) becomes
        :class:`EngineDeadError`: the caller tells a lost engine from a bad request by that type alone. (vLLM
        raises its own EngineDeadError only once it has marked the engine dead, which ``errored`` reads.)"""
        try:
            yield
        except EngineDeadError:
            raise
        except Exception:
            if self.engine.errored:
                raise EngineDeadError("vLLM's engine process stopped") from None
            raise

    async def _render(self, targets: Sequence[Target], chunk: Chunk) -> list:
        """The chunk's engine inputs, one per target: the prompt's tokens and the processed audio (vLLM's renderer).

        The first target is rendered alone, so that vLLM processes and hashes the chunk's audio once and the
        others find it in its processor cache (rendered together, each would process the audio again)."""
        render = self.engine.renderer.render_cmpl_async
        first = await render([engine_input(targets[0], chunk)])
        rest = await render([engine_input(t, chunk) for t in targets[1:]]) if len(targets) > 1 else []
        return [*first, *rest]

    async def _final_output(self, target: Target, rendered, request_id: str):
        """The engine's last output of one request (vLLM ``RequestOutput``)."""
        final = None
        async for out in self.engine.generate(
            rendered, sampling_params(target), request_id, lora_request=lora_request(target)
        ):
            final = out
        return final

    async def _generate(self, target: Target, rendered, chunk: Chunk, request_id: str) -> ChunkScore:
        """One request, rendered again and resent on a retryable ``error`` finish (:func:`needs_resend`)."""
        final = await self._final_output(target, rendered, request_id)
        for attempt in range(1, RESENDS + 1):
            if not needs_resend(final):
                break
            (rendered,) = await self._render([target], chunk)
            final = await self._final_output(target, rendered, f"{request_id}-resent{attempt}")
        return chunk_score(target, chunk, final)

    async def _score_chunk(self, spec: PartSpec, chunk: Chunk, request_id: str) -> list[ChunkScore]:
        """One chunk for every target of the part (holistic score, aspects), in the order of ``spec.targets``."""
        rendered = await self._render(spec.targets, chunk)
        return await asyncio.gather(
            *(self._generate(t, x, chunk, f"{request_id}-{target_name(t)}") for t, x in zip(spec.targets, rendered))
        )

    async def score_answer(self, spec: PartSpec, prepared: PreparedAnswer, request_id: str) -> ScoredAnswer:
        """Score one answer: all its chunks are submitted at once, each for every target (holistic score,
        aspects)."""
        async with self._dead_as_ours():
            per_chunk = await asyncio.gather(
                *(self._score_chunk(spec, c, f"{request_id}-{i}") for i, c in enumerate(prepared.chunks))
            )
        per_target = [list(scores) for scores in zip(*per_chunk)]
        return answer_result(spec, prepared, *score_targets(spec, per_target))

    async def score_batch(
        self, answers: Sequence[tuple[PartSpec, PreparedAnswer]], request_id: str
    ) -> list[ScoredAnswer]:
        """Score several answers, all submitted at once (the engine batches them)."""
        return list(
            await asyncio.gather(*(self.score_answer(s, p, f"{request_id}-{i}") for i, (s, p) in enumerate(answers)))
        )

    def shutdown(self) -> None:
        self.engine.shutdown()
