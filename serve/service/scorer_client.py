"""The ingress's side of the Scorer deployment: its calls, with every failure of the scorer a retryable API error.

- The scorer's queue is full (Serve's back-pressure): 503 ``overloaded``.
- The scorer replica died or cannot be reached while answering, or its
  engine stopped (:class:`serve.engine.contract.EngineDeadError`; Serve's
  health check then replaces the replica): 503 ``unavailable``, never a
  500. Until a scorer answers again, new requests get the same 503 at
  once instead of waiting, for as long as Serve needs to start a
  replacement, on a replica that is gone; calls already waiting for a
  replica then get it too after :data:`GRACE_S`. A call that the dying
  replica had not yet taken does not fail (Serve holds it for another
  replica), so a call waiting longer than :data:`GRACE_S` also asks Serve
  whether any scorer replica runs; none running counts as lost. A probe in
  the background finds out when a scorer is back.
- The files of the part's adapter changed since it was registered: 503
  ``adapter_changed`` (an admin registers the part again; clients retry).
- Readiness: a scorer that answered anything in the last few seconds is
  ready, so ``/readyz`` answers at once under load instead of queueing behind
  answers; otherwise it pings the scorer with a short timeout.

Every 503 carries ``Retry-After``; clients retry with the same ``response_id``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from serve.engine.contract import EngineDeadError
from serve.grading.adapter_files import AdapterChangedError
from serve.grading.audio import PreparedAnswer
from serve.grading.parts import Part
from serve.grading.results import ScoredAnswer
from serve.service.errors import ApiError

logger = logging.getLogger("ray.serve")

#: A scorer that answered within this many seconds counts as ready without a ping.
FRESH_S = 5.0
PING_TIMEOUT_S = 2.0
PROBE_EVERY_S = 1.0
#: A call still unanswered this long after a scorer replica was lost is given up (503): it waits for a replica
#: that may take minutes to replace.
GRACE_S = 5.0
#: Failures that mean the replica is gone, not that the request was bad.
REPLICA_GONE = (RayActorError, DeploymentUnavailableError)


#: How often a call waiting longer than :data:`GRACE_S` may ask Serve how many scorer replicas run.
RUNNING_CHECK_EVERY_S = 1.0


def running_replicas(app: str, deployment: str) -> int:
    """The deployment's RUNNING replicas by Serve's controller (a blocking call)."""
    states = serve.status().applications[app].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


class ScorerClient:
    """Calls into the Scorer deployment from one ingress replica."""

    def __init__(self, handle: DeploymentHandle, retry_after_s: float):
        self.handle = handle
        self.retry = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
        self.last_answer = 0.0  # monotonic time a scorer last answered
        self.down_since: float | None = None
        self.down_reason = ""
        self._probe: asyncio.Task | None = None
        self._running, self._running_at = 1, float("-inf")

    def _unavailable(self, why: str) -> ApiError:
        return ApiError(
            503, "unavailable", f"the scorer is not available ({why}); retry after the Retry-After delay", self.retry
        )

    async def score(self, prepared: PreparedAnswer, request_id: str, part: Part) -> ScoredAnswer:
        """The answer scored under the part version it was accepted under, on a replica that holds its adapter."""
        return await self._call("score", prepared, request_id, part, model_id=part.model_id)

    async def check_part(self, part: Part) -> None:
        """``ValueError`` unless a scorer replica resolves the part and scores a canary chunk with its adapter."""
        await self._call("check_part", part)

    async def _call(self, method: str, *args: Any, model_id: str | None = None) -> Any:
        """``Scorer.<method>(*args)`` on a replica (one that holds ``model_id`` if given)."""
        if self.down_since is not None:
            raise self._unavailable(f"{self.down_reason}; its replacement is starting")
        handle = self.handle if model_id is None else self.handle.options(multiplexed_model_id=model_id)
        started = time.monotonic()
        response = getattr(handle, method).remote(*args)
        call = asyncio.ensure_future(response)
        try:
            while not (await asyncio.wait({call}, timeout=PROBE_EVERY_S))[0]:
                if (
                    self.down_since is None
                    and time.monotonic() - started > GRACE_S
                    and await self._running_replicas() == 0
                ):
                    self._went_down(None)  # the only replica died before taking this call: Serve waits for another
                if self.down_since is not None and time.monotonic() - max(started, self.down_since) > GRACE_S:
                    response.cancel()
                    raise self._unavailable("a scorer replica stopped; this request waited for its replacement")
            result = call.result()
        except asyncio.CancelledError:
            response.cancel()
            raise
        except BackPressureError:
            raise ApiError(
                503, "overloaded", "the scorer is at capacity; retry after the Retry-After delay", self.retry
            ) from None
        except REPLICA_GONE as e:
            self._went_down(e)
            raise self._unavailable("the scorer replica stopped while answering") from None
        except EngineDeadError as e:  # Ray's RayTaskError(EngineDeadError) is one too
            self._went_down(e)
            raise self._unavailable("the scorer's engine stopped before or while answering") from None
        except AdapterChangedError as e:  # Ray's RayTaskError(AdapterChangedError) is one too
            cause = getattr(e, "cause", None) or e
            logger.warning("scorer refused an adapter: %s", cause)
            raise ApiError(503, "adapter_changed", str(cause)[:500], self.retry) from None
        self.last_answer = time.monotonic()
        return result

    async def _running_replicas(self) -> int:
        """Scorer replicas Serve reports RUNNING (asked at most once a second; unknown counts as running)."""
        now = time.monotonic()
        if now - self._running_at >= RUNNING_CHECK_EVERY_S:
            self._running_at = now
            try:
                self._running = await asyncio.to_thread(
                    running_replicas, self.handle.app_name, self.handle.deployment_name
                )
            except Exception:  # noqa: BLE001 - the controller is busy or restarting: no verdict
                self._running = 1
        return self._running

    def _went_down(self, error: BaseException | None) -> None:
        if self.down_since is None:
            why = type(error).__name__ if error is not None else "no scorer replica running"
            logger.warning("scorer replica lost (%s); answering 503 until a scorer answers again", why)
            self.down_since = time.monotonic()
            self.down_reason = (
                "the scorer's engine stopped" if isinstance(error, EngineDeadError) else "a scorer replica stopped"
            )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._wait_until_back())

    async def _wait_until_back(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.handle.ready.remote(), PING_TIMEOUT_S)
                break
            except Exception:  # noqa: BLE001 - no scorer answers yet, whatever the cause
                await asyncio.sleep(PROBE_EVERY_S)
        logger.info("a scorer answers again after %.1f s", time.monotonic() - (self.down_since or time.monotonic()))
        self.down_since = None
        self.last_answer = time.monotonic()

    async def ready(self) -> tuple[bool, str]:
        """Whether a scorer answers, and why not; cheap under load."""
        if self.down_since is not None:
            return False, f"{self.down_reason}; a replacement replica is starting"
        if time.monotonic() - self.last_answer < FRESH_S:
            return True, ""
        try:
            await asyncio.wait_for(self.handle.ready.remote(), PING_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - whatever the failure, the scorer is not ready
            return False, not_ready_reason(e)
        self.last_answer = time.monotonic()
        return True, ""


def not_ready_reason(error: BaseException) -> str:
    """Why a scorer that did not answer the readiness ping is not ready, in words (``/readyz``'s ``reason``)."""
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return (
            f"no scorer replica answered within {PING_TIMEOUT_S:g} s: the scorer is starting "
            "(loading its model) or too busy to answer"
        )
    if isinstance(error, BackPressureError):
        return "the scorer is at capacity and takes no more requests now"
    if isinstance(error, DeploymentUnavailableError):
        return "the scorer deployment is not available (starting, or failed to start)"
    if isinstance(error, RayActorError):
        return "the scorer replica stopped; a replacement is starting"
    if isinstance(error, EngineDeadError):
        return "the scorer's engine stopped; a replacement replica is starting"
    return f"the scorer did not answer ({type(error).__name__})"
