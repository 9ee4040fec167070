"""Offline scoring of many answers with one in-process vLLM engine (``vllm.LLM``).

All chunks of a batch of answers go to one ``generate`` call, so the engine
batches chunks across answers. ``l2grader score``, evaluation and the
benchmark's offline path use it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from serve.engine.requests import (
    chunk_score,
    configure_vllm_environment,
    engine_input,
    engine_kwargs,
    lora_request,
    sampling_params,
)
from serve.grading.answers import answer_result
from serve.grading.audio import PreparedAnswer
from serve.grading.config import GraderConfig
from serve.grading.parts import Part, PartSpec, config_parts, resolve_part
from serve.grading.results import ScoredAnswer


class OfflineEngine:
    """One ``vllm.LLM`` and the parts it scores (the registry's, else the config's) resolved against its tokenizer."""

    def __init__(self, cfg: GraderConfig, parts: Mapping[str, Part] | None = None):
        configure_vllm_environment()
        from vllm import LLM  # after configure_vllm_environment: vLLM reads its environment at import

        self.cfg = cfg
        self.llm = LLM(**engine_kwargs(cfg))
        tokenizer = self.llm.get_tokenizer()
        m = cfg.model
        self.parts: dict[str, PartSpec] = {
            name: resolve_part(part, tokenizer, base=m.base, untrained=m.untrained)
            for name, part in (config_parts(cfg) if parts is None else parts).items()
        }

    def close(self) -> None:
        """Stop the engine's processes now rather than at interpreter exit."""
        from serve.engine.vllm_private import shutdown_engine  # imports vLLM, as __init__ does

        shutdown_engine(self.llm)

    def score_answers(self, answers: Sequence[tuple[str, PreparedAnswer]]) -> list[ScoredAnswer]:
        """Score answers given as (part, prepared answer); every chunk of every answer goes to the engine at once."""
        requests = [(part, chunk) for part, prepared in answers for chunk in prepared.chunks]
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
        for part, prepared in answers:
            spec = self.parts[part]
            scores = [chunk_score(spec, c, outputs[i + k]) for k, c in enumerate(prepared.chunks)]
            i += len(prepared.chunks)
            results.append(answer_result(spec, prepared, scores))
        return results
