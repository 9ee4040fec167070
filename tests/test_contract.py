"""The engine contract without vLLM: the online, offline and fake engines are all an ``Engine``, both real engines
resend a request once when vLLM finishes it with ``error``, and a dead online engine raises ``EngineDeadError``."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serve.engine import offline, online, requests
from serve.engine.contract import Engine, EngineDeadError
from serve.engine.offline import OfflineEngine
from serve.engine.online import OnlineEngine
from tests.fake_engine import FakeEngine


def output(finish_reason: str | None, tag: str = "") -> SimpleNamespace:
    """A vLLM ``RequestOutput`` as far as the resend rule reads it."""
    return SimpleNamespace(outputs=[SimpleNamespace(finish_reason=finish_reason)], tag=tag)


@pytest.mark.parametrize("cls", [OnlineEngine, OfflineEngine, FakeEngine])
def test_every_engine_is_an_engine(cls):
    engine = cls.__new__(cls)  # no model loaded: the contract is the methods
    assert isinstance(engine, Engine)
    for name in ("resolve", "check", "load_adapter", "unload_adapter", "score_answer", "score_batch", "check_health"):
        assert asyncio.iscoroutinefunction(getattr(cls, name)) == asyncio.iscoroutinefunction(getattr(Engine, name))


def test_the_resend_rule_is_one_resend_on_error():
    assert requests.RESENDS == 1
    assert requests.needs_resend(output("error"))
    assert not requests.needs_resend(output("length")) and not requests.needs_resend(output("stop"))


@pytest.fixture
def no_vllm(monkeypatch):
    """The request builders of both engines without vLLM's classes."""
    for module in (online, offline):
        monkeypatch.setattr(module, "sampling_params", lambda target: None)
        monkeypatch.setattr(module, "lora_request", lambda target: None)
    monkeypatch.setattr(offline, "engine_input", lambda target, chunk: {"chunk": chunk})
    monkeypatch.setattr(online, "chunk_score", lambda target, chunk, final: final)


class AsyncLLMStub:
    """``AsyncLLM.generate`` answering each request id with the next finish reason of ``finishes``."""

    def __init__(self, finishes: list[str | None]):
        self.finishes, self.sent, self.errored = list(finishes), [], False

    async def generate(self, rendered, params, request_id, lora_request=None):
        self.sent.append(request_id)
        yield output(self.finishes.pop(0), request_id)

    async def check_health(self):
        pass


def online_engine(finishes: list[str | None]) -> OnlineEngine:
    engine = OnlineEngine.__new__(OnlineEngine)
    engine.engine = AsyncLLMStub(finishes)

    async def render(targets, chunk):
        return [f"rendered {chunk}" for _ in targets]

    engine._render = render
    return engine


@pytest.mark.parametrize(
    "finishes, sent",
    [
        (["length"], ["r"]),
        (["error", "length"], ["r", "r-resent1"]),
        (["error", "error", "length"], ["r", "r-resent1"]),  # once only: the second error is the answer's
    ],
)
def test_online_resends_once_on_error(no_vllm, finishes, sent):
    engine = online_engine(finishes)
    final = asyncio.run(engine._generate(SimpleNamespace(), "x", "c0", "r"))
    assert engine.engine.sent == sent
    assert final.tag == sent[-1]


def test_offline_resends_once_on_error_only_the_failed_requests(no_vllm):
    calls = []

    def generate(inputs, params, lora_request, use_tqdm):
        calls.append([x["chunk"] for x in inputs])
        finishes = {0: ["length", "error", "length", "error"], 1: ["length", "error"]}[len(calls) - 1]
        return [output(f, f"{x['chunk']}#{len(calls)}") for x, f in zip(inputs, finishes)]

    engine = OfflineEngine.__new__(OfflineEngine)
    engine.llm = SimpleNamespace(generate=generate)
    outputs = engine.generate([(SimpleNamespace(), f"c{i}") for i in range(4)])
    assert calls == [["c0", "c1", "c2", "c3"], ["c1", "c3"]]  # one resend, of the failed ones together
    assert [o.tag for o in outputs] == ["c0#1", "c1#2", "c2#1", "c3#2"]
    assert outputs[3].outputs[0].finish_reason == "error"  # failed twice: left for chunk_score to refuse


def test_a_dead_online_engine_raises_engine_dead_for_health_and_scoring(no_vllm):
    engine = online_engine(["length"])
    asyncio.run(engine.check_health())  # alive

    async def died(*_):
        raise RuntimeError("socket closed")  # what a call may raise once vLLM's engine process is gone

    engine.engine.errored = True
    engine.engine.check_health = died
    engine._score_chunk = died
    with pytest.raises(EngineDeadError):
        asyncio.run(engine.check_health())
    with pytest.raises(EngineDeadError):
        asyncio.run(engine.score_answer(None, SimpleNamespace(chunks=["c0"]), "r"))
    engine.engine.errored = False  # the same error from a live engine is the request's own
    with pytest.raises(RuntimeError, match="socket closed"):
        asyncio.run(engine.score_answer(None, SimpleNamespace(chunks=["c0"]), "r"))
