"""The proxy's HTTP connections, bounded: header size, count and time, idle keep-alive, open connections.

Ray Serve's proxy serves HTTP with uvicorn on httptools, which sets no limit on
a request's headers (one client streaming an unterminated header grew a proxy
past 1 GB until Serve killed it), no time limit before a connection's first
request, and believes ``X-Forwarded-For`` from loopback. :class:`BoundedHttpProtocol`
is uvicorn's httptools protocol with these bounds, each from the ``serving``
section of the grader config:

- request line and headers: at most ``max_header_kb`` and ``max_headers``
  fields (431), within ``header_timeout_s`` of the connection's opening or
  the request's first byte (408); an idle keep-alive connection is closed
  after ``keep_alive_timeout_s``;
- open connections: at most ``max_connections`` in all (503) and
  ``max_connections_per_client`` per client address (429); a client at its
  limit may still open a few connections for health and readiness probes;
  a ``trusted_proxies`` address (a load balancer) counts only in the total;
- ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are believed from
  ``trusted_proxies`` only (none by default);
- every answer it makes itself, uvicorn's "Invalid HTTP request" included, is
  the API's JSON error.

So one proxy holds at most ``max_connections`` x (``max_header_kb`` + a few
kB) of unfinished headers, whatever clients send. :func:`use_bounded_protocol`
makes this the protocol the proxy's uvicorn builds; it is the one place that
reaches into uvicorn's module state.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import uuid
from collections import Counter
from dataclasses import dataclass

import httptools
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serve.service.routes import PROBE_PATHS
from serve.service.settings import ServingConfig

#: Connections beyond ``max_connections_per_client`` a client may open, for probes only.
PROBE_RESERVE = 8
#: After a refusal the connection reads (and drops) what the client still sends for this long or this many bytes
#: before it closes, so that the client reads the answer instead of a reset (a "lingering close").
LINGER_S, LINGER_BYTES = 1.0, 1 << 20


@dataclass(frozen=True)
class ConnectionLimits:
    """The connection limits of one proxy, from the config's ``serving`` section."""

    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    keep_alive_timeout_s: float
    max_connections: int
    max_per_client: int
    trusted_proxies: tuple[str, ...]
    retry_after_s: int = 1

    @classmethod
    def of_config(cls, s: ServingConfig, retry_after_s: int = 1) -> ConnectionLimits:
        return cls(
            int(s.max_header_kb * 1024),
            s.max_headers,
            s.header_timeout_s,
            s.keep_alive_timeout_s,
            s.max_connections,
            s.max_connections_per_client,
            tuple(s.trusted_proxies),
            retry_after_s,
        )

    def trusts(self, host: str) -> bool:
        """Whether ``host`` is one of the configured proxies (load balancers)."""
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in ipaddress.ip_network(n, strict=False) for n in self.trusted_proxies)


def error_json(kind: str, message: str, request_id: str = "") -> tuple[bytes, str]:
    """The API's JSON error body (see :mod:`serve.service.errors`) and its request id."""
    request_id = request_id or uuid.uuid4().hex
    body = json.dumps({"error": {"kind": kind, "message": message}, "request_id": request_id}).encode()
    return body, request_id


def raw_error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 JSON error response that closes the connection."""
    body, rid = error_json(kind, message)
    head = [STATUS_LINE[status]]
    fields = {"content-type": "application/json", "content-length": str(len(body)), "x-request-id": rid}
    fields |= {"connection": "close", **{k.lower(): v for k, v in (headers or {}).items()}}
    head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in fields.items()]
    return b"".join([*head, b"\r\n", body])


#: The limits of this process's proxy, set by :func:`use_bounded_protocol`.
_limits: ConnectionLimits | None = None
#: Open connections of this process, by client address (the event loop's thread only).
_open: Counter[str] = Counter()
#: The proxy's app with forwarded headers believed from the trusted proxies only, by uvicorn's loaded app.
_apps: dict[int, object] = {}


def open_connections() -> int:
    """Connections this process holds open now."""
    return sum(_open.values())


def use_bounded_protocol(limits: ConnectionLimits) -> None:
    """Make uvicorn servers started later in this process use :class:`BoundedHttpProtocol` with ``limits``.

    Ray Serve's proxy builds its ``uvicorn.Config`` without an ``http``
    argument, so uvicorn looks its protocol up under "auto" in
    ``uvicorn.config.HTTP_PROTOCOLS`` when the server starts; the proxy
    callback runs before that.
    """
    global _limits
    from uvicorn import config as uvicorn_config

    _limits = limits
    for name in ("auto", "httptools"):
        uvicorn_config.HTTP_PROTOCOLS[name] = f"{__name__}:BoundedHttpProtocol"


def _trusting(app, limits: ConnectionLimits):
    """``app`` (uvicorn's loaded app) believing forwarded headers from ``limits.trusted_proxies`` only."""
    if not isinstance(app, ProxyHeadersMiddleware):
        return app
    if id(app) not in _apps:
        _apps[id(app)] = ProxyHeadersMiddleware(app.app, trusted_hosts=list(limits.trusted_proxies))
    return _apps[id(app)]


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of the module docstring."""

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        if _limits is None:
            raise RuntimeError("use_bounded_protocol() sets the limits before the server starts")
        self.limits = _limits
        self.timeout_keep_alive = self.limits.keep_alive_timeout_s
        self.app = _trusting(self.app, self.limits)
        self.peer = "-"
        self.counted = False
        self.head_timer: asyncio.TimerHandle | None = None
        self.in_head = True  # reading a request line and headers (or waiting for one)
        self.head_bytes = 0
        self.header_count = 0
        self.refusal: tuple[int, str, str, dict[str, str]] | None = None
        self.refused = False
        self.lingered = 0

    # ------------------------------------------------------------ connections

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.peer = self.client[0] if self.client else "-"
        lim = self.limits
        retry = {"Retry-After": str(lim.retry_after_s)}
        if open_connections() >= lim.max_connections:
            return self._refuse(503, "overloaded", "the service holds too many connections now; retry later", retry)
        if not lim.trusts(self.peer) and _open[self.peer] >= lim.max_per_client + PROBE_RESERVE:
            return self._refuse(429, "too_many_connections", self._per_client_message(), retry)
        _open[self.peer] += 1
        self.counted = True
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self.counted:
            self.counted = False
            _open[self.peer] -= 1
            if _open[self.peer] <= 0:
                del _open[self.peer]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            self.lingered += len(data)
            if self.lingered > LINGER_BYTES:
                self.transport.close()
            return
        if self.in_head:
            self.head_bytes += len(data)
            if self.head_timer is None:
                self._arm_head_timer()
        super().data_received(data)
        if self.refused or self.transport.is_closing():
            return
        if self.refusal is None and self.in_head and self.head_bytes > self.limits.max_header_bytes:
            self.refusal = self._too_large()
        if self.refusal is not None:
            self._refuse(*self.refusal)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP, as the API's JSON error."""
        self._refuse(400, "invalid_request", "the request is not valid HTTP/1.1")

    # ------------------------------------------------------------ parser callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > self.limits.max_headers and self.refusal is None:
            self.refusal = self._too_large()
        if self.refusal is None:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self.in_head, self.head_bytes, self.header_count = False, 0, 0
        if self.refusal is None and self._over_client_limit():
            retry = {"Retry-After": str(self.limits.retry_after_s)}
            self.refusal = (429, "too_many_connections", self._per_client_message(), retry)
        if self.refusal is None:
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.in_head = True
        if self.refusal is None:
            super().on_message_complete()

    # ------------------------------------------------------------ helpers

    def _over_client_limit(self) -> bool:
        if self.limits.trusts(self.peer) or _open[self.peer] <= self.limits.max_per_client:
            return False
        try:
            path = httptools.parse_url(self.url).path.decode("latin-1")
        except httptools.HttpParserError:
            return True
        return path not in PROBE_PATHS

    def _per_client_message(self) -> str:
        return f"this client holds too many connections: at most {self.limits.max_per_client} at once"

    def _too_large(self) -> tuple[int, str, str, dict[str, str]]:
        lim = self.limits
        return (
            431,
            "headers_too_large",
            f"request line and headers exceed {lim.max_header_bytes} bytes or {lim.max_headers} fields",
            {},
        )

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self.head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timeout(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or not self.in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return self._arm_head_timer()  # a pipelined request waits for the answer before it
        if self.head_bytes == 0 and self.cycle is not None:
            return self.transport.close()  # an idle keep-alive connection: nothing to answer
        self._refuse(
            408,
            "header_timeout",
            f"the request line and headers did not arrive within {self.limits.header_timeout_s:g} s",
        )

    def _refuse(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        """Answer the JSON error, stop sending, and close after a short linger (what arrives meanwhile is dropped)."""
        self.refused = True
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        self.transport.write(raw_error(status, kind, message, headers))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()
