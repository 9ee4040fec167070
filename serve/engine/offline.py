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
)
from serve.grading.answers import answer_result, score_targets
from serve.grading.audio import Chunk, PreparedAnswer
from serve.grading.config import GraderConfig
from serve.grading.parts import Part, PartSpec, config_parts, resolve_part
from serve.grading.results import ScoredAnswer

#: An answer to score: its part, by name (one of the engine's parts) or resolved, and the prepared answer.
Answer = tuple[str | PartSpec, PreparedAnswer]


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
    """One ``vllm.LLM`` and the parts it scores (the registry's, else the config's) resolved against its tokenizer.

    An :class:`serve.engine.contract.Engine`; its async methods run the engine in the caller's thread (they block
    its event loop), as ``vllm.LLM`` takes one call at a time. Synchronous callers use :meth:`score_answers`."""

    def __init__(self, cfg: GraderConfig, parts: Mapping[str, Part] | None = None):
        configure_vllm_environment()
        from vllm import LLM  # after configure_vllm_environment: vLLM reads its environment at import

        from serve.engine.vllm_private import log_thread_refusals_once  # imports vLLM, as above

        self.cfg = cfg
        log_thread_refusals_once()
        with _engine_in_this_process():
            # its progress bars would reach this process's stderr, the program's own lines
            self.llm = LLM(**engine_kwargs(cfg), use_tqdm_on_load=False)
        self.tokenizer = self.llm.get_tokenizer()
        self.parts: dict[str, PartSpec] = {
            name: self.resolve(part) for name, part in (config_parts(cfg) if parts is None else parts).items()
        }

    def resolve(self, part: Part) -> PartSpec:
        """A checked part resolved against this engine's tokenizer (raises if a label is not one token)."""
        return resolve_part(part, self.tokenizer, self.cfg)

    def check(self, part: Part) -> PartSpec:
        """``resolve``, and ``ValueError`` unless the prompt fits the context and the LoRA matrices fit the model."""
        return check_part(part, self.tokenizer, self.cfg, self.llm.llm_engine.model_config.hf_config)

    async def load_adapter(self, spec: PartSpec) -> None:
        """Load the part's adapters now (else vLLM loads them on their first request)."""
        for target in adapters_of(spec):
            self.llm.llm_engine.add_lora(lora_request(target))

    async def unload_adapter(self, spec: PartSpec) -> None:
        """Drop the part's adapters from the engine."""
        for target in adapters_of(spec):
            self.llm.llm_engine.remove_lora(target.adapter_int_id)

    async def score_answer(self, spec: PartSpec, prepared: PreparedAnswer, request_id: str) -> ScoredAnswer:
        """One answer: a batch of one."""
        (result,) = await self.score_batch([(spec, prepared)], request_id)
        return result

    async def score_batch(
        self, answers: Sequence[tuple[PartSpec, PreparedAnswer]], request_id: str
    ) -> list[ScoredAnswer]:
        """:meth:`score_answers` (vLLM names its requests itself: ``request_id`` is not used)."""
        return self.score_answers(answers)

    async def check_health(self) -> None:
        """Nothing to check: the engine runs in this process, alive while the caller is."""

    def shutdown(self) -> None:
        """Stop the engine and free its model and key-value cache now rather than at interpreter exit."""
        from serve.engine.vllm_private import shutdown_engine  # imports vLLM, as __init__ does

        shutdown_engine(self.llm)
        del self.llm
        gc.collect()

    def _spec(self, part: str | PartSpec, specs: Mapping[str, PartSpec] | None) -> PartSpec:
        return part if isinstance(part, PartSpec) else (self.parts if specs is None else specs)[part]

    def requests(
        self, answers: Sequence[Answer], specs: Mapping[str, PartSpec] | None = None
    ) -> list[tuple[Target, Chunk]]:
        """Every chunk of every answer, each chunk's targets (holistic score, aspects) one after another so that
        they share its cached audio; ``specs`` overrides the parts' (the benchmark scores without aspects)."""
        return [
            (target, chunk)
            for part, prepared in answers
            for chunk in prepared.chunks
            for target in self._spec(part, specs).targets
        ]

    def generate(self, requests: Sequence[tuple[Target, Chunk]], cache_salts: Sequence[str | None] | None = None):
        """The engine's outputs (vLLM ``RequestOutput``) of the requests, in order, in one ``generate`` call; those
        vLLM finished with a retryable error are sent again together (:func:`needs_resend`).

        A request with a ``cache_salt`` shares no prefix-cache block with any request of another salt."""
        salts = list(cache_salts or ())
        salts += [None] * (len(requests) - len(salts))
        outputs = self._generate(requests, salts)
        for _ in range(RESENDS):
            again = [i for i, out in enumerate(outputs) if needs_resend(out)]
            if not again:
                break
            for i, out in zip(again, self._generate([requests[i] for i in again], [salts[i] for i in again])):
                outputs[i] = out
        return outputs

    def _generate(self, requests: Sequence[tuple[Target, Chunk]], salts: Sequence[str | None]) -> list:
        inputs = [engine_input(target, chunk) for target, chunk in requests]
        for x, salt in zip(inputs, salts):
            if salt is not None:
                x["cache_salt"] = salt
        return self.llm.generate(
            inputs,
            [sampling_params(target) for target, _ in requests],
            lora_request=[lora_request(target) for target, _ in requests],
            use_tqdm=sys.stderr.isatty(),
        )

    def results(
        self, answers: Sequence[Answer], outputs: Sequence, specs: Mapping[str, PartSpec] | None = None
    ) -> list[ScoredAnswer]:
        """The scored answers from the outputs of :meth:`requests` (same ``answers`` and ``specs``)."""
        outputs = iter(outputs)
        results = []
        for part, prepared in answers:
            spec = self._spec(part, specs)
            per_target = [[] for _ in spec.targets]
            for chunk in prepared.chunks:
                for scores, target in zip(per_target, spec.targets):
                    scores.append(chunk_score(target, chunk, next(outputs)))
            results.append(answer_result(spec, prepared, *score_targets(spec, per_target)))
        return results

    def score_answers(self, answers: Sequence[Answer]) -> list[ScoredAnswer]:
        """Score answers given as (part, prepared answer); every chunk of every answer goes to the engine at once."""
        requests = self.requests(answers)
        return self.results(answers, self.generate(requests)) if requests else []
