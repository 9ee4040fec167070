"""The ingress's scorer client with a fake deployment handle: when no scorer replica runs, waiting calls get a 503.

A call that a dying replica had not yet taken does not fail in Ray Serve: it
waits for a replacement (a minute or more). The client asks Serve how many
scorer replicas run once a call has waited :data:`GRACE_S`; none running
counts as lost. (The real service's kill test covers the other path, a call
that fails with the replica.)
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serve.engine.contract import EngineDeadError
from serve.service import scorer_client
from serve.service.errors import ApiError
from serve.service.scorer_client import ScorerClient

PART = SimpleNamespace(model_id="m")  # what the client reads of a part


class NeverAnswering:
    """A deployment handle whose calls wait forever (no replica takes them)."""

    app_name, deployment_name = "l2grader", "Scorer"

    def __init__(self):
        self.calls = 0

    def options(self, **_):
        return self

    def __getattr__(self, method):
        handle = self

        class Method:
            @staticmethod
            def remote(*args):
                handle.calls += 1
                return asyncio.get_running_loop().create_future()

        return Method()


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(scorer_client, "GRACE_S", 0.3)
    monkeypatch.setattr(scorer_client, "PROBE_EVERY_S", 0.05)
    monkeypatch.setattr(scorer_client, "RUNNING_CHECK_EVERY_S", 0.0)
    monkeypatch.setattr(scorer_client, "PING_TIMEOUT_S", 0.05)


def test_a_call_waiting_while_no_scorer_replica_runs_gets_503(fast, monkeypatch):
    monkeypatch.setattr(scorer_client, "running_replicas", lambda app, deployment: 0)

    async def run():
        client = ScorerClient(NeverAnswering(), retry_after_s=2)
        with pytest.raises(ApiError) as first:
            await asyncio.wait_for(client.score(None, "r1", PART), timeout=10)
        with pytest.raises(ApiError) as second:  # at once, without waiting: the scorer is known to be down
            await asyncio.wait_for(client.score(None, "r2", PART), timeout=0.5)
        return first.value, second.value, await client.ready()

    first, second, ready = asyncio.run(run())
    for err in (first, second):
        assert err.status == 503 and err.kind == "unavailable" and err.headers == {"Retry-After": "2"}
    assert ready[0] is False


def _controller_busy(app, deployment):
    raise TimeoutError("controller busy")


@pytest.mark.parametrize("running", [lambda app, deployment: 1, _controller_busy], ids=["replica_running", "no_answer"])
def test_a_long_call_keeps_waiting_unless_no_replica_runs(fast, monkeypatch, running):
    """A long answer on a running replica is not given up, nor when the controller gives no verdict: only
    'no replica running' counts as lost."""
    monkeypatch.setattr(scorer_client, "running_replicas", running)

    async def run():
        client = ScorerClient(NeverAnswering(), retry_after_s=2)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.score(None, "r1", PART), timeout=1.5)
        return client.down_since

    assert asyncio.run(run()) is None


def test_readyz_says_in_words_why_no_scorer_answers(fast):
    """While the scorer starts, its readiness ping times out: the reason is a sentence, not "TimeoutError"."""

    async def run():
        return await ScorerClient(NeverAnswering(), retry_after_s=2).ready()

    ready, reason = asyncio.run(run())
    assert not ready
    assert reason.startswith("no scorer replica answered within 0.05 s: the scorer is starting"), reason
    assert "Error" not in reason


@pytest.mark.parametrize(
    "error, words",
    [
        (asyncio.TimeoutError(), "the scorer is starting"),
        (scorer_client.BackPressureError(num_queued_requests=3, max_queued_requests=2), "at capacity"),
        (scorer_client.DeploymentUnavailableError("Scorer"), "deployment is not available"),
        (EngineDeadError("gone"), "the scorer's engine stopped"),
        (RuntimeError("x"), "the scorer did not answer (RuntimeError)"),
    ],
)
def test_every_failed_readiness_ping_has_a_reason_in_words(error, words):
    assert words in scorer_client.not_ready_reason(error)


class DeadEngine:
    """A deployment handle whose replica's engine is dead until ``revive``: every call raises EngineDeadError, as
    Ray raises the replica's (a RayTaskError that is one)."""

    app_name, deployment_name = "l2grader", "Scorer"

    def __init__(self):
        self.alive = False

    def options(self, **_):
        return self

    def revive(self):
        self.alive = True

    def __getattr__(self, method):
        handle = self

        class Method:
            @staticmethod
            def remote(*args):
                async def answer():
                    if not handle.alive:
                        raise EngineDeadError("the fake engine was killed")
                    return True

                return asyncio.ensure_future(answer())

        return Method()


def test_a_dead_engine_is_a_503_unavailable_and_not_ready_until_a_scorer_answers(fast):
    async def run():
        handle = DeadEngine()
        client = ScorerClient(handle, retry_after_s=2)
        errors = []
        for request_id in ("r1", "r2"):
            with pytest.raises(ApiError) as e:
                await asyncio.wait_for(client.score(None, request_id, PART), timeout=2)
            errors.append(e.value)
        not_ready = await client.ready()
        handle.revive()  # the replacement replica answers the client's probe
        for _ in range(100):
            if client.down_since is None:
                break
            await asyncio.sleep(0.02)
        return errors, not_ready, await client.ready(), await client.score(None, "r3", PART)

    errors, not_ready, ready, scored = asyncio.run(run())
    for err in errors:
        assert err.status == 503 and err.kind == "unavailable" and err.headers == {"Retry-After": "2"}
    assert "engine stopped" in errors[0].message
    assert not_ready == (False, "the scorer's engine stopped; a replacement replica is starting")
    assert ready == (True, "") and scored is True
