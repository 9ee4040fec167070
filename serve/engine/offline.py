"""Offline scoring of many answers with one in-process vLLM engine (``vllm.LLM``).

All chunks of a batch of answers go to one ``generate`` call, so the engine
batches chunks across answers. ``l2grader score``, evaluation and the
benchmark's offline path use it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from serve.engine.requests import (
    chunk_score,
    configure_vllm_environment,
    engine_input,
    engine_kwargs,
    lora_request,
    sampling_params,
)
from serve.grading.audio import Chunk
from serve.grading.config import GraderConfig
from serve.grading.parts import PartSpec, resolve_parts
from serve.grading.results import ScoredAnswer
from serve.grading.scoring import aggregate


class OfflineEngine:
    """One ``vllm.LLM`` and the config's parts resolved against its tokenizer."""

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

    def score_answers(self, answers: Sequence[tuple[str, list[Chunk]]]) -> list[ScoredAnswer]:
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
            results.append(aggregate(part, spec.levels, scores, spec.model, spec.intervals))
        return results
