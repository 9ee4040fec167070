"""The proxy's HTTP connections, bounded: header size, count and time, idle keep-alive, open connections.

Ray Serve's proxy serves HTTP with uvicorn on httptools, which sets no limit on
a request's headers (one client streaming an unterminated header grew a proxy
past 1 GB until Serve killed it), no time limit before a connection's first
request, and believes ``X-Forwarded-For`` from loopback. :class:`BoundedHttpProtocol`
(:mod:`serve.service.uvicorn_private`)
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
(in :mod:`serve.service.uvicorn_private`, the one module that reaches into
uvicorn's internals) makes it the protocol the proxy's uvicorn builds.
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from dataclasses import dataclass
from http import HTTPStatus

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
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode("latin-1")]
    fields = {"content-type": "application/json", "content-length": str(len(body)), "x-request-id": rid}
    fields |= {"connection": "close", **{k.lower(): v for k, v in (headers or {}).items()}}
    head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in fields.items()]
    return b"".join([*head, b"\r\n", body])
