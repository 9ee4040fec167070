"""An engine stand-in for the scorer replica: no vLLM, but the same contract (serve.engine.contract.Engine) and
observable adapter use.

It "scores" in ``SECONDS_PER_AUDIO_SECOND`` of wall time per second of audio,
keeps the set of adapters loaded, and fails a request whose adapter is not
loaded when it starts or was unloaded while it ran, which is what a real
engine must never see. Its engine "dies" when the file named by
:data:`DEAD_ENV` is written after the engine was built: from then on it raises
``EngineDeadError`` as the online engine does once vLLM's engine process is
gone; an engine built later (the replacement replica's) is healthy.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np

from serve.engine.contract import EngineDeadError
from serve.grading.answers import answer_result, score_targets
from serve.grading.parts import Part, PartSpec, resolve_part
from serve.grading.scoring import ChunkScore

SECONDS_PER_AUDIO_SECOND = 0.1
#: Environment variable naming a file where the fake engine appends one line per adapter load and unload
#: ("load <part>", "unload <part>"), so a test sees what a replica in another process did.
EVENTS_ENV = "L2GRADER_FAKE_ENGINE_EVENTS"
#: Environment variable naming a file of part names: while it exists, a request of a part it names waits before
#: it is scored, so that a test orders what the replica does by events, not by sleeps. Each request also appends
#: "score <part>" to the events file once it has started.
HOLD_ENV = "L2GRADER_FAKE_ENGINE_HOLD"
#: Environment variable naming a file; writing it kills every fake engine built before.
DEAD_ENV = "L2GRADER_FAKE_ENGINE_DEAD"


def _record(event: str, part: str) -> None:
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {part}\n")


def _holds(part: str) -> bool:
    try:
        with open(os.environ.get(HOLD_ENV) or "") as f:
            return part in f.read().split()
    except FileNotFoundError:
        return False


async def _held(part: str) -> None:
    while _holds(part):
        await asyncio.sleep(0.05)


class LetterTokenizer:
    """Each character is one token."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


class FakeEngine:
    def __init__(self, cfg):
        self.cfg = cfg
        self.loaded: set[str] = set()  # adapter hashes, as vLLM keys adapters by an id made of the hash
        self.dead = False
        self.born = time.time()

    async def check_health(self) -> None:
        path = os.environ.get(DEAD_ENV)
        if self.dead or (path and os.path.exists(path) and os.path.getmtime(path) >= self.born):
            self.dead = True  # a dead engine stays dead
            raise EngineDeadError("the fake engine was killed")

    def resolve(self, part: Part) -> PartSpec:
        return resolve_part(part, LetterTokenizer(), self.cfg)

    def check(self, part: Part) -> PartSpec:
        return self.resolve(part)

    async def load_adapter(self, spec: PartSpec) -> None:
        self.loaded.add(spec.adapter_hash)
        _record("load", spec.part)

    async def unload_adapter(self, spec: PartSpec) -> None:
        self.loaded.discard(spec.adapter_hash)
        _record("unload", spec.part)

    def _check_loaded(self, spec: PartSpec, when: str) -> None:
        if spec.adapter_path is not None and spec.adapter_hash not in self.loaded:
            raise RuntimeError(f"adapter {spec.model_id} not loaded {when}")

    async def score_answer(self, spec: PartSpec, prepared, request_id: str):
        chunks = prepared.chunks
        await self.check_health()
        if request_id != "warm-up":
            self._check_loaded(spec, "when its request started")
            _record("score", spec.part)
            await _held(spec.part)
        await asyncio.sleep(SECONDS_PER_AUDIO_SECOND * sum(c.duration_s for c in chunks))
        await self.check_health()
        if request_id != "warm-up":
            self._check_loaded(spec, "while its request ran")
        uniform = [
            [ChunkScore(c.start_s, c.end_s, np.full(len(t.levels), 1.0 / len(t.levels))) for c in chunks]
            for t in spec.targets
        ]
        return answer_result(spec, prepared, *score_targets(spec, uniform))

    async def score_batch(self, answers, request_id: str):
        return list(
            await asyncio.gather(*(self.score_answer(s, p, f"{request_id}-{i}") for i, (s, p) in enumerate(answers)))
        )

    def shutdown(self) -> None:
        pass
