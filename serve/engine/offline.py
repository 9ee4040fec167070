"""Offline scoring of many answers with one in-process vLLM engine (``vllm.LLM``).

All chunks of a batch of answers go to one ``generate`` call, so the engine
batches chunks across answers. ``l2grader score``, evaluation, the session's
engine actors and the benchmark's offline path use it.

The engine core and its model worker run in the calling process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` while the engine is built). On the CPU
backend vLLM would otherwise spawn two processes that each import vLLM and
torch again: about 17 s of a 2-core start, at the same offline throughput
(docs/benchmarks.md). The service's engine (serve/engine/online.py) keeps its
own processes.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from serve.engine.requests import (
    Target,
    chunk_score,
    configure_vllm_environment,
    engine_input,
    engine_kwargs,
    lora_request,
    sampling_params,
)
from serve.grading.answers import answer_result, score_targets
from serve.grading.audio import Chunk, PreparedAnswer
from serve.grading.config import GraderConfig
from serve.grading.parts import Part, PartSpec, config_parts, resolve_part
from serve.grading.results import ScoredAnswer


@contextmanager
def _engine_in_this_process() -> Iterator[None]:
    """vLLM builds the engine core and its worker in this process; the environment is restored after, so that
    a process this one starts later (a service) gets vLLM's default."""
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    before = os.environ.get(key)
    os.environ[key] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


class OfflineEngine:
    """One ``vllm.LLM`` and the parts it scores (the registry's, else the config's) resolved against its tokenizer."""

    def __init__(self, cfg: GraderConfig, parts: Mapping[str, Part] | None = None):
        configure_vllm_environment()
        from vllm import LLM  # after configure_vllm_environment: vLLM reads its environment at import

        from serve.engine.vllm_private import log_thread_refusals_once  # imports vLLM, as above

        self.cfg = cfg
        log_thread_refusals_once()
        with _engine_in_this_process():
            # its progress bars would reach this process's stderr, the program's own lines
            self.llm = LLM(**engine_kwargs(cfg), use_tqdm_on_load=False)
        tokenizer = self.llm.get_tokenizer()
        self.parts: dict[str, PartSpec] = {
            name: resolve_part(part, tokenizer, cfg)
            for name, part in (config_parts(cfg) if parts is None else parts).items()
        }

    def close(self) -> None:
        """Stop the engine and free its model and key-value cache now rather than at interpreter exit."""
        from serve.engine.vllm_private import shutdown_engine  # imports vLLM, as __init__ does

        shutdown_engine(self.llm)
        del self.llm
        gc.collect()

    def requests(
        self, answers: Sequence[tuple[str, PreparedAnswer]], specs: Mapping[str, PartSpec] | None = None
    ) -> list[tuple[Target, Chunk]]:
        """Every chunk of every answer, each chunk's targets (holistic score, aspects) one after another so that
        they share its cached audio; ``specs`` overrides the parts' (the benchmark scores without aspects)."""
        specs = self.parts if specs is None else specs
        return [
            (target, chunk) for part, prepared in answers for chunk in prepared.chunks for target in specs[part].targets
        ]

    def generate(self, requests: Sequence[tuple[Target, Chunk]], cache_salts: Sequence[str | None] | None = None):
        """The engine's outputs (vLLM ``RequestOutput``) of the requests, in order, in one ``generate`` call.

        A request with a ``cache_salt`` shares no prefix-cache block with any request of another salt."""
        inputs = [engine_input(target, chunk) for target, chunk in requests]
        for x, salt in zip(inputs, cache_salts or ()):
            if salt is not None:
                x["cache_salt"] = salt
        return self.llm.generate(
            inputs,
            [sampling_params(target) for target, _ in requests],
            lora_request=[lora_request(target) for target, _ in requests],
            use_tqdm=sys.stderr.isatty(),
        )

    def results(
        self,
        answers: Sequence[tuple[str, PreparedAnswer]],
        outputs: Sequence,
        specs: Mapping[str, PartSpec] | None = None,
    ) -> list[ScoredAnswer]:
        """The scored answers from the outputs of :meth:`requests` (same ``answers`` and ``specs``)."""
        specs = self.parts if specs is None else specs
        outputs = iter(outputs)
        results = []
        for part, prepared in answers:
            spec = specs[part]
            per_target = [[] for _ in spec.targets]
            for chunk in prepared.chunks:
                for scores, target in zip(per_target, spec.targets):
                    scores.append(chunk_score(target, chunk, next(outputs)))
            results.append(answer_result(spec, prepared, *score_targets(spec, per_target)))
        return results

    def score_answers(self, answers: Sequence[tuple[str, PreparedAnswer]]) -> list[ScoredAnswer]:
        """Score answers given as (part, prepared answer); every chunk of every answer goes to the engine at once."""
        requests = self.requests(answers)
        return self.results(answers, self.generate(requests)) if requests else []
