"""What each Ray Serve proxy does before a request reaches the ingress: hold slow clients, bound them, speak JSON.

Ray Serve's proxy hands a request to an ingress replica as soon as its headers
arrive, and the replica then waits for the body: a client that sends its body
slowly holds an ingress slot for as long as it likes, and enough of them fill
every slot, health probes included. :class:`ProxyGuard` runs inside every
proxy (Ray Serve's proxy callback, ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)
and, per request:

- with API keys configured, refuses a request with a body whose key is
  missing or wrong (401) or not an admin key on an admin route (403) before
  reading any of its body, so keyless clients hold no body-buffer room;
- refuses a client address that already holds ``serving.max_requests_per_client``
  requests (429), health and readiness probes excepted; the address is the
  one ``X-Forwarded-For`` names only from ``serving.trusted_proxies``
  (:mod:`serve.service.http_limits`, which also bounds headers and connections);
- keeps a client's ``x-request-timeout-seconds`` only when it shortens
  ``serving.request_timeout_s``;
- reads the whole body within ``serving.body_timeout_s`` (408 and the
  connection closed otherwise) and within the route's size limit (413), so
  the ingress only ever sees complete requests;
- holds at most ``serving.max_buffered_mb`` of bodies for all clients together
  (503 beyond);
- without any API key configured, refuses clients beyond this machine unless
  the service was started with ``--allow-unauthenticated`` (403);
- behind the project's edge (:mod:`serve.service.edge`), refuses a request
  that does not carry the edge's secret (403): it went around the edge
  (health and readiness probes excepted: the orchestrator's own);
- turns the errors the proxy makes itself (back-pressure 503, timeouts, and
  the empty answer it gives when the ingress replica died mid-request) into
  the API's JSON error body, with ``Retry-After`` on every 503.

A route's size limit, whether it needs an admin key and whether it is a probe
come from the route table the ingress declares its routes from
(:mod:`serve.service.routes`), so every route gets its own limit.

The proxy reads the grader config named by ``L2GRADER_CONFIG``;
:func:`proxy_env` gives the variables a Ray node needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.grading.config import clip
from serve.runtime.ray_private import is_backpressure_text, is_replica_gone_text
from serve.service.auth import ApiKeys, allow_unauthenticated, is_loopback, keyed
from serve.service.edge import EDGE_HEADER, EDGE_HEADER_BYTES, EDGE_HEADERS, EDGE_PEERS_ENV, EDGE_TOKEN_ENV
from serve.service.errors import ApiError
from serve.service.http_limits import ConnectionLimits, error_json
from serve.service.routes import PROBE_PATHS, Access, route_of
from serve.service.settings import ServiceConfig, load_service_config
from serve.service.uploads import UploadLimits
from serve.service.uvicorn_private import use_bounded_protocol

logger = logging.getLogger("ray.serve")

CONFIG_ENV = "L2GRADER_CONFIG"
PROXY_CALLBACK = "serve.service.proxy_guard:middlewares"
#: Methods whose requests carry no body the guard waits for.
BODYLESS = {"GET", "HEAD", "OPTIONS", "DELETE"}


def proxy_env(config_path: str) -> dict[str, str]:
    """The environment a Ray node's proxy needs to run the guard for the config at ``config_path``."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK, CONFIG_ENV: config_path}


@dataclass(frozen=True)
class GuardLimits:
    """The guard's limits, from the grader config."""

    uploads: UploadLimits
    body_timeout_s: float
    max_per_client: int
    max_buffered: int
    retry_after_s: int
    local_only: bool
    request_timeout_s: float = math.inf
    keys: ApiKeys | None = None  # None: no keys configured
    edge_token: str | None = None  # set: every request must come through the edge (serve.service.edge)

    @classmethod
    def of_config(cls, cfg: ServiceConfig) -> GuardLimits:
        """The limits of ``cfg``; keys are read from the environment (:class:`ConfigError` if a named one is unset)."""
        s = cfg.serving
        return cls(
            UploadLimits(cfg),
            s.body_timeout_s,
            s.max_requests_per_client,
            int(s.max_buffered_mb * 1024 * 1024),
            max(1, math.ceil(s.ingress.retry_after_s)),
            local_only=not keyed(s) and not allow_unauthenticated(s),
            request_timeout_s=s.request_timeout_s,
            keys=ApiKeys(s) if keyed(s) else None,
            edge_token=os.environ.get(EDGE_TOKEN_ENV) or None,
        )


def middlewares() -> list[Middleware]:
    """Ray Serve's proxy callback: the guard, configured from ``$L2GRADER_CONFIG`` (start fails without it)."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"{CONFIG_ENV} must name the grader config for the proxy guard")
    cfg = load_service_config(path)
    limits = GuardLimits.of_config(cfg)
    connections = ConnectionLimits.of_config(cfg.serving, limits.retry_after_s)
    if limits.edge_token:  # behind the edge: its address is the one whose X-Forwarded-For is believed
        peers = tuple(p for p in os.environ.get(EDGE_PEERS_ENV, "").split(",") if p)
        connections = dataclasses.replace(
            connections,
            trusted_proxies=connections.trusted_proxies + peers,
            max_header_bytes=connections.max_header_bytes + EDGE_HEADER_BYTES,  # room for what the edge adds
            max_headers=connections.max_headers + EDGE_HEADERS,
        )
    use_bounded_protocol(connections)
    return [Middleware(ProxyGuard, limits=limits)]


class BodyError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def error_messages(
    status: int, kind: str, message: str, request_id: str = "", headers: dict[str, str] | None = None
) -> list[Message]:
    """The ASGI messages of a JSON error in the API's shape (see :mod:`serve.service.errors`)."""
    body, request_id = error_json(kind, message, request_id)
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return [
        {"type": "http.response.start", "status": status, "headers": raw},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


class ProxyGuard:
    """Pure ASGI middleware around a Ray Serve proxy (see the module docstring)."""

    def __init__(self, app: ASGIApp, limits: GuardLimits):
        self.app, self.limits = app, limits
        self.held: Counter[str] = Counter()  # client address -> requests open
        self.buffered = 0  # body bytes held, all requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = scope["client"][0] if scope.get("client") else "-"
        retry = {"Retry-After": str(self.limits.retry_after_s)}
        if (
            self.limits.edge_token is not None
            and not _from_edge(scope, self.limits.edge_token)
            and not (scope["method"] in ("GET", "HEAD") and scope["path"] in PROBE_PATHS)  # the orchestrator's probes
        ):
            return await _send_all(
                send, error_messages(403, "forbidden", "this service is reached through its edge only")
            )
        if self.limits.local_only and not is_loopback(client):
            return await _send_all(
                send,
                error_messages(
                    403, "forbidden", "this service has no API keys and accepts clients on its own machine only"
                ),
            )
        if self.limits.keys is not None and _has_body(scope):
            try:  # the key before the body: a keyless client never holds body-buffer room
                self.limits.keys.check(_authorization(scope), admin=_is_admin_route(scope), client_host=client)
            except ApiError as e:
                return await _send_all(send, error_messages(e.status, e.kind, e.message, headers=e.headers))
        _bound_request_timeout(scope, self.limits.request_timeout_s)
        # Probes are never refused for their address's other requests.
        if self.held[client] >= self.limits.max_per_client and scope["path"] not in PROBE_PATHS:
            return await _send_all(
                send,
                error_messages(
                    429,
                    "too_many_requests",
                    f"this client already holds {self.held[client]} requests: "
                    f"at most {self.limits.max_per_client} at once",
                    headers=retry,
                ),
            )
        self.held[client] += 1
        body: bytes | None = None
        try:
            if _has_body(scope):
                try:
                    body = await self._read_body(scope, receive)
                except BodyError as e:
                    headers = {"Connection": "close", **(retry if e.status == 503 else {})}
                    return await _send_all(send, error_messages(e.status, e.kind, e.message, headers=headers))
                if body is None:  # the client went away
                    return
            answer = JsonErrors(send, retry)
            try:
                await self.app(scope, receive if body is None else _replay(body, receive), answer)
            except Exception:  # the server's own answer would be text; the log has the traceback
                logger.exception("proxy failed on %s %s", scope["method"], clip(scope["path"], 100))
                if answer.started:
                    raise
                return await _send_all(send, error_messages(500, "internal", "internal error in the service's proxy"))
            if not answer.started:  # the proxy answers nothing when the replica died mid-request (its "500")
                logger.info("no answer from the ingress for %s %s: 503", scope["method"], clip(scope["path"], 100))
                with contextlib.suppress(Exception):  # the client may be gone too
                    await _send_all(
                        send,
                        error_messages(
                            503,
                            "unavailable",
                            "the service lost this request (a replica stopped); retry after the Retry-After delay",
                            headers=retry,
                        ),
                    )
        finally:
            if body is not None:
                self.buffered -= len(body)
            self.held[client] -= 1
            if not self.held[client]:
                del self.held[client]

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body within the time and size limits; None if the client disconnected."""
        limit = self.limits.uploads.body_limit(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            raise BodyError(413, "too_large", f"body of {declared} bytes exceeds the {limit} bytes accepted here")
        deadline = time.monotonic() + self.limits.body_timeout_s
        buf = bytearray()
        whole = False
        try:
            while not whole:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise BodyError(
                        408, "body_timeout", f"the request body did not arrive within {self.limits.body_timeout_s:g} s"
                    ) from None
                if message["type"] == "http.disconnect":
                    return None
                piece = message.get("body", b"")
                buf += piece
                self.buffered += len(piece)
                if len(buf) > limit:
                    raise BodyError(413, "too_large", f"body exceeds the {limit} bytes accepted here")
                if self.buffered > self.limits.max_buffered:
                    raise BodyError(503, "overloaded", "the service holds too many request bodies now; retry later")
                whole = not message.get("more_body", False)
        finally:
            if not whole:  # refused or abandoned: its bytes are no longer held (a whole body's are, until answered)
                self.buffered -= len(buf)
        return bytes(buf)


class JsonErrors:
    """A ``send`` that turns an error the proxy made itself (plain text) into the API's JSON error."""

    def __init__(self, send: Send, retry: dict[str, str]):
        self.send, self.retry = send, retry
        self.started = False
        self.start: Message | None = None
        self.text = bytearray()

    async def __call__(self, message: Message) -> None:
        self.started = True
        if message["type"] == "http.response.start" and message["status"] >= 400 and not _is_json(message):
            self.start = message
            return
        if self.start is None:
            return await self.send(message)
        self.text += message.get("body", b"")[: 4096 - len(self.text)]
        if message.get("more_body", False):
            return
        status, kind, text = self.start["status"], "http_error", self.text.decode("utf-8", "replace")
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in self.start.get("headers", [])
            if k.lower() in (b"retry-after", b"x-request-id")
        }
        rid = headers.pop("x-request-id", "")
        if status == 503:
            kind = "overloaded" if is_backpressure_text(text) else "unavailable"
        elif status == 500 and is_replica_gone_text(text):
            status, kind = 503, "unavailable"
        elif status == 500:
            kind, text = "internal", f"internal error; quote request id {rid} when reporting it"
        elif status == 408:
            kind = "timeout"
        elif status == 404:
            kind = "not_found"
        if status == 503:
            headers = {**self.retry, **headers}
            text = "the service cannot take this request now; retry after the Retry-After delay"
            logger.info(
                "proxy answered %s for request %s: %s", kind, rid, clip(self.text.decode("utf-8", "replace"), 300)
            )
        await _send_all(self.send, error_messages(status, kind, clip(text, 300), rid, headers))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the buffered body first, then the client's later messages (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_all(send: Send, messages: list[Message]) -> None:
    for m in messages:
        await send(m)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v
    return None


def _content_length(scope: Scope) -> int | None:
    v = _header(scope, b"content-length")
    return int(v) if v is not None and v.isdigit() else None


def _declares_body(scope: Scope) -> bool:
    return bool(_content_length(scope)) or _header(scope, b"transfer-encoding") is not None


def _has_body(scope: Scope) -> bool:
    """Whether the guard reads a body for this request (every method but the bodyless ones, unless they declare one)."""
    return scope["method"] not in BODYLESS or _declares_body(scope)


def _from_edge(scope: Scope, token: str) -> bool:
    """Whether the request carries the edge's secret (it came through the edge, which sets it on each request)."""
    return hmac.compare_digest(_header(scope, EDGE_HEADER.encode()) or b"", token.encode())


def _authorization(scope: Scope) -> str:
    return (_header(scope, b"authorization") or b"").decode("latin-1")


def _is_admin_route(scope: Scope) -> bool:
    """Whether the request is for a route that needs an admin key (those that change the part registry)."""
    route = route_of(scope["method"], scope["path"])
    return route is not None and route.access is Access.ADMIN


TIMEOUT_HEADER = b"x-request-timeout-seconds"


def _bound_request_timeout(scope: Scope, limit_s: float) -> None:
    """Keep a client's ``x-request-timeout-seconds`` only when it shortens ``limit_s`` (Ray Serve reads 0 or less
    as "no timeout" and takes any larger value as given)."""
    headers = scope.get("headers", [])
    if not any(k.lower() == TIMEOUT_HEADER for k, _ in headers):
        return
    kept = []
    for k, v in headers:
        if k.lower() == TIMEOUT_HEADER:
            try:
                asked = float(v)
            except ValueError:
                continue
            if not (0 < asked < limit_s):
                continue
        kept.append((k, v))
    scope["headers"] = kept


def _is_json(start: Message) -> bool:
    ctype = next((v for k, v in start.get("headers", []) if k.lower() == b"content-type"), b"")
    return b"json" in ctype
