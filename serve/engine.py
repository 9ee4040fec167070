"""Scoring through vLLM: engine settings, one prefill per chunk, label log-probabilities out.

Each chunk is one request with ``max_tokens=1``, sampling restricted to the
part's label tokens, and the engine in ``processed_logprobs`` mode, so the
log-probabilities returned are those of the labels after the restriction:
exactly the label set, normalised over it. Requests carry their part's LoRA
adapter; vLLM loads it on first use and batches requests of different
adapters together.

The offline :class:`BatchScorer` (``vllm.LLM``) scores many answers in one
``generate`` call, so the engine batches chunks across answers. The HTTP
service drives ``AsyncLLM`` with the same request builders.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from serve.audio import SAMPLE_RATE, Chunk
from serve.config import GraderConfig
from serve.parts import PartSpec, resolve_parts
from serve.protocol import ScoredAnswer
from serve.scoring import ChunkScore, aggregate, label_probabilities


def configure_vllm_environment() -> None:
    """Process-wide vLLM settings; call before importing vllm.

    Logs go to stderr so that stdout carries only results.
    """
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def on_cpu() -> bool:
    """True when vLLM runs on its CPU backend (no GPU)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_kwargs(cfg: GraderConfig) -> dict[str, Any]:
    """vLLM engine arguments for a config (shared by ``LLM`` and ``AsyncLLM``)."""
    e = cfg.engine
    max_rank = e.max_lora_rank
    return dict(
        model=cfg.model.base,
        dtype=e.dtype,
        seed=e.seed,
        max_model_len=e.max_model_len,
        max_num_seqs=e.max_num_seqs,
        gpu_memory_utilization=e.memory_share,
        tensor_parallel_size=e.tensor_parallel_size,
        enforce_eager=e.enforce_eager,
        enable_lora=True,
        max_lora_rank=max_rank,
        max_loras=e.max_loras,
        max_cpu_loras=e.max_cpu_loras,
        limit_mm_per_prompt={"audio": 1},
        logprobs_mode="processed_logprobs",
        enable_prefix_caching=True,
    )


def sampling_params(spec: PartSpec):
    """One output position, restricted to the labels, returning every label's log-probability."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        logprobs=len(spec.label_token_ids),
        allowed_token_ids=list(spec.label_token_ids),
    )


def lora_request(spec: PartSpec):
    """The part's adapter as a vLLM ``LoRARequest`` (None for the base model)."""
    if spec.adapter_path is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=spec.adapter_name, lora_int_id=spec.adapter_int_id, lora_path=str(spec.adapter_path))


def engine_input(spec: PartSpec, chunk: Chunk) -> dict[str, Any]:
    """The prompt and audio of one chunk, as vLLM takes them (audio already 16 kHz mono)."""
    return {"prompt": spec.prompt, "multi_modal_data": {"audio": (chunk.samples, SAMPLE_RATE)}}


def chunk_score(spec: PartSpec, chunk: Chunk, output) -> ChunkScore:
    """Read the label distribution of a finished request (a vLLM ``RequestOutput``)."""
    completion = output.outputs[0]
    if not completion.logprobs:
        raise RuntimeError(f"engine returned no logprobs for a chunk of part {spec.part!r}")
    by_id = completion.logprobs[0]  # token id -> Logprob, ordered by probability, not by label
    missing = [tid for tid in spec.label_token_ids if tid not in by_id]
    if missing:
        raise RuntimeError(f"engine returned no logprob for label token ids {missing}")
    lps = [by_id[tid].logprob for tid in spec.label_token_ids]
    return ChunkScore(chunk.start_s, chunk.end_s, label_probabilities(lps))


class BatchScorer:
    """Offline scoring of many answers with one in-process vLLM engine (``vllm.LLM``)."""

    def __init__(self, cfg: GraderConfig):
        configure_vllm_environment()
        from vllm import LLM

        self.cfg = cfg
        self.llm = LLM(**engine_kwargs(cfg))
        self.parts: dict[str, PartSpec] = resolve_parts(cfg, self.llm.get_tokenizer())

    def close(self) -> None:
        """Stop the engine's processes now rather than at interpreter exit."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def score_chunks(self, answers: Sequence[tuple[str, list[Chunk]]]) -> list[ScoredAnswer]:
        """Score answers given as (part, chunks); every chunk of every answer goes to the engine at once."""
        requests = [(part, chunk) for part, chunks in answers for chunk in chunks]
        if not requests:
            return []
        specs = [self.parts[part] for part, _ in requests]
        outputs = self.llm.generate(
            [engine_input(spec, chunk) for spec, (_, chunk) in zip(specs, requests)],
            [sampling_params(spec) for spec in specs],
            lora_request=[lora_request(spec) for spec in specs],
            use_tqdm=sys.stderr.isatty(),
        )
        results, i = [], 0
        for part, chunks in answers:
            spec = self.parts[part]
            scores = [chunk_score(spec, c, outputs[i + k]) for k, c in enumerate(chunks)]
            i += len(chunks)
            results.append(aggregate(part, spec.levels, scores, spec.model))
        return results

    def score_waves(self, part: str, waves: Sequence[np.ndarray]) -> list[ScoredAnswer]:
        """Score already-decoded 16 kHz answers of one part (no speech check)."""
        from serve.audio import split

        return self.score_chunks([(part, split(w, self.cfg.audio.max_chunk_s)) for w in waves])


class AsyncScorer:
    """Online scoring with vLLM's ``AsyncLLM``: concurrent requests share continuous batches."""

    def __init__(self, cfg: GraderConfig):
        configure_vllm_environment()
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.cfg = cfg
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(cfg)))
        self.tokenizer = self.engine.get_tokenizer()
        self._next_id = 0

    def resolve(self, part: str, pcfg) -> PartSpec:
        """Check a part against this engine's tokenizer (label tokens, adapter files and rank)."""
        from serve.parts import resolve_part

        return resolve_part(
            part,
            pcfg,
            self.tokenizer,
            base=self.cfg.model.base,
            untrained=self.cfg.model.untrained,
            max_lora_rank=self.cfg.engine.max_lora_rank,
        )

    async def load_adapter(self, spec: PartSpec) -> None:
        """Load the part's adapter into the engine now (not on the first request)."""
        req = lora_request(spec)
        if req is not None:
            await self.engine.add_lora(req)

    async def unload_adapter(self, spec: PartSpec) -> None:
        """Drop the part's adapter from the engine."""
        if spec.adapter_path is not None:
            await self.engine.remove_lora(spec.adapter_int_id)

    async def _score_chunk(self, spec: PartSpec, chunk: Chunk, request_id: str) -> ChunkScore:
        final = None
        async for out in self.engine.generate(
            engine_input(spec, chunk), sampling_params(spec), request_id, lora_request=lora_request(spec)
        ):
            final = out
        return chunk_score(spec, chunk, final)

    async def score(self, spec: PartSpec, chunks: Sequence[Chunk], request_id: str) -> ScoredAnswer:
        """Score one answer: all its chunks are submitted at once."""
        import asyncio

        scores = await asyncio.gather(
            *(self._score_chunk(spec, c, f"{request_id}-{i}") for i, c in enumerate(chunks))
        )
        return aggregate(spec.part, spec.levels, scores, spec.model)

    def shutdown(self) -> None:
        self.engine.shutdown()
