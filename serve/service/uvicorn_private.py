"""Every use of uvicorn internals: written for uvicorn 0.55.0 on httptools 0.9.0, refused by any other release.

uvicorn documents its ``Config``, ``Server`` and settings; its protocol
classes (their parser callbacks, ``cycle``, ``url``, ``send_400_response``),
its protocol table ``uvicorn.config.HTTP_PROTOCOLS`` and the ``app`` inside its
``ProxyHeadersMiddleware`` are internal and may change in any release. The
proxy's bounded HTTP protocol needs all of them, so it lives here and nowhere
else (``tests/test_fences.py`` checks that):

- :class:`BoundedHttpProtocol`: uvicorn's httptools protocol enforcing
  :class:`serve.service.http_limits.ConnectionLimits` (see that module for
  the bounds and why);
- :func:`use_bounded_protocol`: makes it the protocol that uvicorn servers
  started later in this process build (Ray Serve's proxy's among them).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from importlib.metadata import version

import httptools
import uvicorn
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve.service.http_limits import LINGER_BYTES, LINGER_S, PROBE_RESERVE, ConnectionLimits, raw_error
from serve.service.routes import PROBE_PATHS

WRITTEN_FOR = {"uvicorn": "0.55.0", "httptools": "0.9.0"}
for _library, _wanted in WRITTEN_FOR.items():
    _installed = uvicorn.__version__ if _library == "uvicorn" else version(_library)
    if _installed != _wanted:
        raise ImportError(
            f"serve.service.uvicorn_private was written for {_library} {_wanted}, but {_library} {_installed} is "
            f"installed: install {_library}=={_wanted} (scripts/install.sh) or re-check this module against the "
            "new release"
        )

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


def forget_connections() -> None:
    """Forget this process's open connections (a test's server stopped without closing them one by one)."""
    _open.clear()


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
