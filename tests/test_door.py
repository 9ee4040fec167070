"""The door's bounds without Ray: the proxy's HTTP protocol on a real uvicorn server, the guard's key and probe rules.

:class:`serve.service.uvicorn_private.BoundedHttpProtocol` runs here inside a real
uvicorn server on loopback, spoken to over raw sockets (what an attacker
sends); the proxy guard is driven directly, as in tests/test_hardening.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import pytest
import uvicorn

from serve.service.http_limits import PROBE_RESERVE, ConnectionLimits
from serve.service.proxy_guard import ProxyGuard
from serve.service.uvicorn_private import forget_connections, open_connections, use_bounded_protocol
from tests.test_hardening import FakeProxy, _limits, _request, until


def _conn_limits(**kw) -> ConnectionLimits:
    base = dict(
        max_header_bytes=4096,
        max_headers=20,
        header_timeout_s=0.5,
        keep_alive_timeout_s=0.5,
        max_connections=50,
        max_per_client=4,
        trusted_proxies=(),
        retry_after_s=2,
    )
    return ConnectionLimits(**{**base, **kw})


async def _echo_client(scope, receive, send):
    """An app that answers the client address it was given."""
    body = json.dumps({"client": scope["client"][0], "path": scope["path"]}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(limits: ConnectionLimits):
    """A uvicorn server on loopback with the bounded protocol (configured as Ray Serve's proxy configures it)."""
    use_bounded_protocol(limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_echo_client, lifespan="off", access_log=False, log_config=None, log_level="critical")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await until(lambda: server.started, "server started")
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        forget_connections()


async def _exchange(port: int, data: bytes = b"", wait_s: float = 3.0) -> tuple[int, dict, bytes, float]:
    """Send ``data`` on a new connection, read until the server closes it; status, headers, body and seconds taken."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    if data:
        writer.write(data)
    raw = await _read_all(reader, wait_s)
    writer.close()
    return (*_parse(raw), time.monotonic() - started)


async def _read_all(reader: asyncio.StreamReader, wait_s: float) -> bytes:
    """What the server sends until it closes the connection (or ``wait_s`` passes without a byte)."""
    raw = b""
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), wait_s):
            raw += chunk
    return raw


def _parse(raw: bytes) -> tuple[int, dict, bytes]:
    if not raw:
        return 0, {}, b""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _kind(body: bytes) -> str:
    return json.loads(body)["error"]["kind"]


GET = b"GET /v1/parts HTTP/1.1\r\nHost: x\r\n"


def test_headers_past_the_size_or_count_limit_get_431_json_at_once():
    async def run():
        async with serving(_conn_limits()) as port:
            # An unterminated header streamed without end: refused once the limit is passed, not held.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answer = asyncio.create_task(_read_all(reader, 5))
            writer.write(GET + b"X-Big: ")
            sent = 0
            with contextlib.suppress(ConnectionError):
                while sent < 16 << 20 and not answer.done():
                    writer.write(b"a" * 65536)
                    await writer.drain()
                    sent += 65536
            answer = await answer
            writer.close()
            many = await _exchange(port, GET + b"".join(b"X-%d: 1\r\n" % i for i in range(21)) + b"\r\n")
            fine = await _exchange(port, GET + b"X-A: 1\r\nConnection: close\r\n\r\n")
            return sent, _parse(answer), many, fine

    sent, big, many, fine = asyncio.run(run())
    assert big[0] == 431 and _kind(big[2]) == "headers_too_large" and big[1]["content-type"] == "application/json"
    assert sent < 16 << 20  # the server closed the connection long before the client was done
    assert many[0] == 431 and _kind(many[2]) == "headers_too_large"
    assert fine[0] == 200


def test_slow_or_missing_headers_get_408_and_idle_keep_alive_connections_close():
    async def run():
        async with serving(_conn_limits(header_timeout_s=0.4, keep_alive_timeout_s=0.3)) as port:
            silent = await _exchange(port)
            slowloris = await _exchange(port, GET + b"X-A: 1\r\n")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET + b"\r\n")
            started = time.monotonic()
            raw = b""
            while chunk := await asyncio.wait_for(reader.read(65536), 3):
                raw += chunk
            writer.close()
            return silent, slowloris, _parse(raw), time.monotonic() - started

    silent, slowloris, kept, idle_s = asyncio.run(run())
    for status, _, body, took in (silent, slowloris):
        assert status == 408 and _kind(body) == "header_timeout" and 0.3 < took < 2
    assert kept[0] == 200 and idle_s < 2  # answered, then closed after the keep-alive time without a new request


def test_bytes_that_are_not_http_get_a_json_400():
    async def run():
        async with serving(_conn_limits()) as port:
            return await _exchange(port, b"\x16\x03\x01 not http at all\r\n\r\n")

    status, headers, body, _ = asyncio.run(run())
    assert status == 400 and headers["content-type"] == "application/json" and _kind(body) == "invalid_request"


def test_connections_are_bounded_per_client_and_in_all_and_probes_still_pass():
    async def run():
        async with serving(_conn_limits(max_per_client=3, max_connections=20)) as port:
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            await until(lambda: open_connections() == 3, "three connections counted")
            probe = await _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            over = await _exchange(port, GET + b"Connection: close\r\n\r\n")
            held += [await asyncio.open_connection("127.0.0.1", port) for _ in range(PROBE_RESERVE)]
            await until(lambda: open_connections() == 3 + PROBE_RESERVE, "the probes' reserve taken")
            refused_at_once = await _exchange(port)
            for _, w in held:
                w.close()
            await until(lambda: open_connections() == 0, "the held connections closed")
            after = await _exchange(port, GET + b"Connection: close\r\n\r\n")
        async with serving(_conn_limits(max_per_client=100, max_connections=5)) as port:
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
            await until(lambda: open_connections() == 5, "five connections counted")
            full = await _exchange(port)
            for _, w in held:
                w.close()
        return probe, over, refused_at_once, after, full

    probe, over, refused_at_once, after, full = asyncio.run(run())
    assert probe[0] == 200
    assert over[0] == 429 and _kind(over[2]) == "too_many_connections" and over[1]["retry-after"] == "2"
    assert refused_at_once[0] == 429 and refused_at_once[3] < 1
    assert after[0] == 200
    assert full[0] == 503 and _kind(full[2]) == "overloaded" and full[1]["retry-after"] == "2"


@pytest.mark.parametrize("trusted,want", [((), "127.0.0.1"), (("127.0.0.0/8",), "203.0.113.9")])
def test_forwarded_addresses_are_believed_from_trusted_proxies_only(trusted, want):
    async def run():
        async with serving(_conn_limits(trusted_proxies=trusted)) as port:
            return await _exchange(port, GET + b"X-Forwarded-For: 203.0.113.9\r\nConnection: close\r\n\r\n")

    status, _, body, _ = asyncio.run(run())
    assert status == 200 and json.loads(body)["client"] == want


# ---------------------------------------------------------------- the guard


class Keys:
    """The guard's view of API keys: ``user`` scores, ``admin`` also changes parts."""

    def check(self, authorization: str, admin: bool, client_host: str | None = None) -> None:
        from serve.service.errors import ApiError

        token = authorization.removeprefix("Bearer ")
        if token not in ("user", "admin"):
            raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "Bearer"})
        if admin and token != "admin":
            raise ApiError(403, "forbidden", "this call needs an admin key")


def test_a_body_is_never_read_before_its_key_is_checked():
    app = FakeProxy()
    guard = ProxyGuard(app, _limits(keys=Keys()))

    def send(path: str, key: str | None, method: str = "POST"):
        hdrs = [(b"content-length", b"3")] + ([(b"authorization", f"Bearer {key}".encode())] if key else [])
        return asyncio.run(_request(guard, [b"abc"], path=path, method=method, headers=hdrs))

    keyless, wrong = send("/v1/score", None), send("/v1/score", "nope")
    user_on_admin = send("/v1/parts/p", "user", method="PUT")
    assert app.bodies == [] and guard.buffered == 0  # nothing read, nothing held
    assert keyless[0] == wrong[0] == 401 and keyless[1]["www-authenticate"] == "Bearer"
    assert user_on_admin[0] == 403 and _kind(user_on_admin[2]) == "forbidden"
    assert send("/v1/score", "user")[0] == 200 and send("/v1/parts/p", "admin", method="PUT")[0] == 200
    assert app.bodies == [b"abc", b"abc"]


def test_probes_are_never_refused_for_their_addresses_other_requests():
    app = FakeProxy()
    guard = ProxyGuard(app, _limits(max_per_client=2))

    async def run():
        app.release.clear()
        held = [asyncio.create_task(_request(guard, [b"x"], client="10.0.0.9")) for _ in range(2)]
        await until(lambda: guard.held["10.0.0.9"] == 2, "two requests held")
        refused = await _request(guard, [b"x"], client="10.0.0.9")
        probes = [
            asyncio.create_task(_request(guard, [], method="GET", path=p, client="10.0.0.9", headers=[]))
            for p in ("/healthz", "/readyz")
        ]
        await until(lambda: len(app.bodies) == 4, "the probes at the app")
        app.release.set()
        return refused, await asyncio.gather(*probes), await asyncio.gather(*held)

    refused, probes, held = asyncio.run(run())
    assert refused[0] == 429 and [p[0] for p in probes] == [200, 200] and [h[0] for h in held] == [200, 200]


@pytest.mark.parametrize(
    "asked,kept",
    [(b"-1", False), (b"0", False), (b"1e9", False), (b"inf", False), (b"nan", False), (b"x", False), (b"5", True)],
)
def test_a_client_may_shorten_the_request_timeout_but_not_remove_it(asked, kept):
    seen = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]).get(b"x-request-timeout-seconds"))
        await FakeProxy()(scope, receive, send)

    guard = ProxyGuard(app, _limits(request_timeout_s=600))
    status, _, _ = asyncio.run(
        _request(guard, [], method="GET", path="/v1/parts", headers=[(b"x-request-timeout-seconds", asked)])
    )
    assert status == 200 and seen == [asked if kept else None]


def test_a_failure_inside_the_proxy_is_answered_as_json():
    async def app(scope, receive, send):
        raise RuntimeError("boom at /secret/path")

    status, headers, body = asyncio.run(_request(ProxyGuard(app, _limits()), [b"x"]))
    assert status == 500 and _kind(body) == "internal" and "secret" not in body.decode()


# ---------------------------------------------------------------- what answers name: content, not paths


def test_an_adapter_rewritten_in_place_gets_a_new_hash_and_fails_the_load_check(tiny_dir, tmp_path):
    import os
    import shutil

    from serve.grading.adapter_files import AdapterChangedError, check_adapter, verify_content

    shutil.copytree(tiny_dir / "adapters" / "interview", tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    before = check_adapter(tmp_path / "a")
    verify_content("p", before)
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same modification time
    with pytest.raises(AdapterChangedError, match="part 'p' changed") as e:
        verify_content("p", before)
    assert str(tmp_path) not in str(e.value)
    assert check_adapter(tmp_path / "a").content_hash != before.content_hash


def test_answers_name_the_base_model_and_its_hash_not_its_path(tiny_dir, tmp_path):
    import shutil

    from serve.grading.config import GraderConfig, PartConfig
    from serve.grading.parts import Part, resolve_part
    from tests.fake_engine import LetterTokenizer

    def resolved(base: str, untrained: bool):
        cfg = GraderConfig(model={"base": base, "untrained": untrained}, parts={"p": PartConfig()})
        return resolve_part(Part("p", PartConfig(), None), LetterTokenizer(), cfg)

    shutil.copytree(tiny_dir / "model", tmp_path / "secret" / "tiny-model")
    model = resolved(str(tmp_path / "secret" / "tiny-model"), True).model
    assert model.base == "tiny-model" and len(model.base_hash) == 16 and "secret" not in model.model_dump_json()
    hub = resolved("Org/Model-7B", False).model
    assert hub.base == "Model-7B" and hub.base_hash is None


def test_the_metrics_page_names_no_node_address():
    from serve.service.cluster_metrics import merge, render

    export = (
        "# TYPE ray_l2grader_answers_total counter\n"
        'ray_l2grader_answers_total{NodeAddress="10.1.2.3",SessionName="session_x_123",part="p"} 2\n'
    )
    page = render(merge([export, export.replace("10.1.2.3", "10.1.2.4")])).decode()
    assert "10.1.2." not in page and "session_x" not in page
    assert 'ray_l2grader_answers_total{part="p"} 4.0' in page
