"""Fail-closed start-up, the proxy guard, scoring slots and adapter checks, without an engine.

The same behaviour through the real service (vLLM, Ray Serve, HTTP) is in
tests/test_service.py; here each rule is checked on its own, with a stand-in
for Ray Serve's proxy app where a proxy is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import pytest
import yaml

from serve.grading.adapter_files import AdapterError, check_adapter, check_lora_dims
from serve.grading.config import ConfigError, GraderConfig, PartConfig, clip, validate_part_id
from serve.grading.registry import PartRegistry
from serve.service import server
from serve.service.admission import ScoringSlots
from serve.service.auth import read_keys
from serve.service.errors import ApiError
from serve.service.proxy_guard import GuardLimits, ProxyGuard
from serve.service.server import listen_host, metrics_line
from serve.service.settings import ServiceConfig
from serve.service.uploads import UploadLimits
from tests.conftest import l2grader

# ---------------------------------------------------------------- fail closed


def test_a_named_key_variable_that_is_unset_or_empty_refuses(monkeypatch):
    monkeypatch.delenv("L2G_UNSET", raising=False)
    with pytest.raises(ConfigError, match="L2G_UNSET.*not set"):
        read_keys("L2G_UNSET")
    monkeypatch.setenv("L2G_EMPTY", " , ")
    with pytest.raises(ConfigError, match="L2G_EMPTY.*empty"):
        read_keys("L2G_EMPTY")
    monkeypatch.setenv("L2G_SET", "a, b")
    assert read_keys("L2G_SET") == ["a", "b"] and read_keys(None) == []


def test_serve_with_an_unset_key_variable_exits_2_with_one_line(tiny_config, tmp_path):
    raw = tiny_config()
    raw["serving"] = {"api_keys_env": "L2G_NOT_SET_USER", "admin_keys_env": "L2G_NOT_SET_ADMIN"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith("L2G_NOT_SET")}
    run = l2grader("serve", "--config", cfg, env=env, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("l2grader:")]
    assert len(lines) == 1 and "L2G_NOT_SET_USER" in lines[0] and "not set" in lines[0], run.stderr[-2000:]


def _cfg(**serving) -> ServiceConfig:
    return ServiceConfig.model_validate({"model": {"base": "m"}, "parts": {"p": {}}, "serving": serving})


def test_without_keys_the_service_listens_on_loopback_unless_allowed(monkeypatch):
    monkeypatch.setenv("L2G_K", "k")
    assert listen_host(_cfg(host="0.0.0.0"), None, False) == "127.0.0.1"
    assert listen_host(_cfg(), "0.0.0.0", False) == "127.0.0.1"
    assert listen_host(_cfg(), "::1", False) == "::1"
    assert listen_host(_cfg(), "0.0.0.0", True) == "0.0.0.0"
    assert listen_host(_cfg(host="0.0.0.0", allow_unauthenticated=True), None, False) == "0.0.0.0"
    assert listen_host(_cfg(host="0.0.0.0", api_keys_env="L2G_K"), None, False) == "0.0.0.0"


def test_serve_says_who_can_read_the_metrics_export():
    """Ray's exporter listens on every interface unless the node's address is loopback: the line says so."""
    line = metrics_line("http://192.0.2.2:39945/metrics")
    assert line.startswith("metrics export of this node: http://192.0.2.2:39945/metrics (")
    assert "every machine that reaches this one" in line and "firewall" in line
    assert metrics_line("http://127.0.0.1:39945/metrics").endswith("(this machine only)")
    assert "none" in metrics_line(None)


def test_a_stop_deletes_the_application_before_leaving_ray(monkeypatch):
    """A Ray of its own: the application is deleted (replicas stop gracefully), then Ray stops, without
    serve.shutdown (whose controller call ends in Ray's 'graceful_shutdown failed' line); joined: serve.shutdown.
    Ray is left even when the stop fails, and the error goes on."""
    calls: list[str] = []
    monkeypatch.setattr(server.serve, "delete", lambda name: calls.append(f"delete {name}"))
    monkeypatch.setattr(server.serve, "shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(server.ray, "shutdown", lambda: calls.append("ray.shutdown"))
    server.stop_service(joined=False)
    assert calls == [f"delete {server.APP_NAME}", "ray.shutdown"]
    calls.clear()
    server.stop_service(joined=True)
    assert calls == ["serve.shutdown", "ray.shutdown"]
    calls.clear()

    def fails(name):
        raise RuntimeError("controller gone")

    monkeypatch.setattr(server.serve, "delete", fails)
    with pytest.raises(RuntimeError, match="controller gone"):
        server.stop_service(joined=False)
    assert calls == ["ray.shutdown"]


def test_part_ids_and_echoed_strings_are_bounded():
    validate_part_id("a" * 64)
    for bad in ("a" * 65, "", "a/b", "é"):
        with pytest.raises(ValueError):
            validate_part_id(bad)
    assert len(clip("x" * 10_000_000)) < 120


# ---------------------------------------------------------------- the proxy guard


async def until(condition, what: str, timeout_s: float = 10) -> None:
    """Return once ``condition()`` holds, checked each turn of the event loop; fail naming ``what`` after
    ``timeout_s``. Tests order concurrent requests by what the code under test did, not by sleeps."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"no {what} in {timeout_s:g} s"
        await asyncio.sleep(0.001)


class FakeProxy:
    """Stands in for Ray Serve's proxy app: reads the body, then answers what the test tells it to."""

    def __init__(
        self,
        status: int = 200,
        text: bytes = b'{"ok": true}',
        ctype: bytes = b"application/json",
        headers: list | None = None,
    ):
        self.status, self.text, self.ctype, self.headers = status, text, ctype, headers or []
        self.bodies: list[bytes] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, scope, receive, send):
        body = b""
        while scope["method"] != "GET":
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.bodies.append(body)
        await self.release.wait()
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", self.ctype), *self.headers],
            }
        )
        await send({"type": "http.response.body", "body": self.text})


def _limits(**kw) -> GuardLimits:
    cfg = ServiceConfig.model_validate({"model": {"base": "m"}, "parts": {"p": {}}})
    base = dict(
        uploads=UploadLimits(cfg),
        body_timeout_s=0.3,
        max_per_client=3,
        max_buffered=10 << 20,
        retry_after_s=2,
        local_only=False,
    )
    return GuardLimits(**{**base, **kw})


async def _request(
    guard,
    body_parts: list[bytes],
    *,
    method="POST",
    path="/v1/score",
    client="10.0.0.1",
    gap_s: float = 0.0,
    headers: list | None = None,
):
    """One request through ``guard``; the client sends ``body_parts`` ``gap_s`` apart. Returns status, headers, body."""
    queue = list(body_parts)
    sent: list[dict] = []

    async def receive():
        if not queue:
            await asyncio.sleep(3600)  # a client that keeps the connection open
        await asyncio.sleep(gap_s)
        piece = queue.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(queue)}

    async def send(m):
        sent.append(m)

    size = sum(len(p) for p in body_parts)
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "client": (client, 1234),
        "headers": headers if headers is not None else [(b"content-length", str(size).encode())],
    }
    await guard(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    hdrs = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], hdrs, body


def test_the_guard_hands_on_complete_bodies_only():
    app = FakeProxy()
    guard = ProxyGuard(app, _limits())
    status, _, _ = asyncio.run(_request(guard, [b"ab", b"cd", b"ef"], gap_s=0.01))
    assert status == 200 and app.bodies == [b"abcdef"]
    assert guard.buffered == 0 and not guard.held


def test_a_body_slower_than_the_deadline_gets_408_json_and_the_connection_closed():
    app = FakeProxy()
    guard = ProxyGuard(app, _limits(body_timeout_s=0.3))
    status, headers, body = asyncio.run(_request(guard, [b"a"] * 10, gap_s=0.1))
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["error"]["kind"] == "body_timeout" and json.loads(body)["request_id"]
    assert app.bodies == [] and guard.buffered == 0 and not guard.held


def test_bodies_past_the_route_limit_get_413_before_or_while_reading():
    guard = ProxyGuard(FakeProxy(), _limits())
    big = UploadLimits(_cfg()).body_limit("PUT", "/v1/parts/x") + 1
    status, _, body = asyncio.run(
        _request(guard, [b"x"], method="PUT", path="/v1/parts/x", headers=[(b"content-length", str(big).encode())])
    )
    assert status == 413 and json.loads(body)["error"]["kind"] == "too_large"
    chunked = [(b"transfer-encoding", b"chunked")]
    status, _, _ = asyncio.run(_request(guard, [b"x" * 40_000, b"x" * 40_000], path="/healthz", headers=chunked))
    assert status == 413 and guard.buffered == 0


def _concrete(path: str) -> str:
    return path.replace("{part}", "interview")


def test_the_application_declares_exactly_the_routes_of_the_table_the_guard_reads():
    """A route the guard does not know would get its small default body limit (and no admin check): every route of
    the application is a row of the table, with the key the table names, and every row is a route."""
    from fastapi.routing import APIRoute

    from serve.service.auth import require_admin, require_user
    from serve.service.ingress import app
    from serve.service.routes import ROUTES, Access

    table = {(r.method, r.path): r for r in ROUTES}
    declared = set()
    for r in app.routes:
        if not isinstance(r, APIRoute):
            continue  # /openapi.json and the docs' assets
        if not r.endpoint.__module__.startswith("serve."):  # the API document's pages (fastapi_offline's)
            assert r.methods <= {"GET", "HEAD"}, r.path
            continue
        keys = {d.call for d in r.dependant.dependencies} & {require_user, require_admin}
        for method in r.methods:
            row = table.get((method, r.path))
            assert row is not None, f"{method} {r.path} is not in serve.service.routes.ROUTES"
            assert row.name == r.name
            want = {Access.USER: {require_user}, Access.ADMIN: {require_admin}}.get(row.access, set())
            assert keys == want, f"{method} {r.path}"
            declared.add((method, r.path))
    assert declared == set(table)


def test_every_route_that_takes_a_body_gets_its_own_limit():
    from serve.service.routes import ROUTES, Body

    cfg = _cfg(max_batch_upload_mb=300)
    cfg.audio.max_upload_mb = 10
    limits = UploadLimits(cfg)
    audio = 10 * 1024 * 1024
    for r in ROUTES:
        got = limits.body_limit(r.method, _concrete(r.path))
        assert got == limits.body_limit(r.method, _concrete(r.path) + "/")  # the redirected form too
        if r.body is Body.ANSWER:  # multipart, or base64 in JSON: 4/3 of the audio and the envelope
            assert audio * 4 / 3 + 4096 < got <= audio * 4 / 3 + 128 * 1024, r
        elif r.body is Body.BATCH:
            assert got == 300 * 1024 * 1024
        elif r.body is Body.PART:
            assert got == 1024 * 1024
        else:
            assert got == 64 * 1024
        assert r.body is not Body.NONE or r.method in ("GET", "DELETE"), f"{r.method} {r.path} takes no body?"
    assert limits.body_limit("POST", "/v1/score/json") == limits.body_limit("POST", "/v1/score")
    assert limits.body_limit("POST", "/v1/no/such/route") == 64 * 1024
    assert limits.body_limit("POST", "/v1/parts/x") == 64 * 1024  # no such route (405): nothing to buffer for it


@pytest.mark.parametrize(
    ("method", "path", "kind", "status"),
    [
        ("PUT", "/v1/parts/p", "user", 403),
        ("PUT", "/v1/parts/p", "admin", 200),
        ("POST", "/v1/score", "user", 200),
        ("POST", "/v1/score/json", "user", 200),
        ("POST", "/v1/score/batch", "user", 200),
        ("POST", "/v1/score/json", "none", 401),
    ],
)
def test_the_guard_asks_the_route_table_which_key_a_route_needs(method, path, kind, status):
    class Keys:
        def check(self, authorization: str, admin: bool, client_host: str | None = None) -> None:
            token = authorization.removeprefix("Bearer ")
            if token not in ("user", "admin"):
                raise ApiError(401, "unauthorized", "invalid API key")
            if admin and token != "admin":
                raise ApiError(403, "forbidden", "this call needs an admin key")

    guard = ProxyGuard(FakeProxy(), _limits(keys=Keys()))
    headers = [(b"content-length", b"1"), (b"authorization", f"Bearer {kind}".encode())]
    assert asyncio.run(_request(guard, [b"x"], method=method, path=path, headers=headers))[0] == status


def test_one_client_holds_a_bounded_number_of_requests_and_others_are_unaffected():
    app = FakeProxy()
    guard = ProxyGuard(app, _limits(max_per_client=3))

    async def run():
        app.release.clear()
        held = [asyncio.create_task(_request(guard, [b"x"], client="10.0.0.9")) for _ in range(3)]
        await until(lambda: guard.held["10.0.0.9"] == 3, "three requests held")
        refused = await _request(guard, [b"x"], client="10.0.0.9")
        app.release.set()
        other = await _request(guard, [b"x"], client="10.0.0.8")
        return refused, other, await asyncio.gather(*held)

    refused, other, held = asyncio.run(run())
    assert refused[0] == 429 and refused[1]["retry-after"] == "2"
    assert json.loads(refused[2])["error"]["kind"] == "too_many_requests"
    assert other[0] == 200 and [h[0] for h in held] == [200, 200, 200] and not guard.held


def test_bodies_held_by_all_clients_together_are_bounded():
    guard = ProxyGuard(FakeProxy(), _limits(max_buffered=1000))
    status, headers, body = asyncio.run(_request(guard, [b"x" * 600, b"x" * 600]))
    assert status == 503 and headers["retry-after"] == "2" and json.loads(body)["error"]["kind"] == "overloaded"
    assert guard.buffered == 0


@pytest.mark.parametrize(
    "status,text,want_status,want_kind",
    [
        (
            503,
            b"Request dropped due to backpressure (num_queued_requests=5, max_queued_requests=5).",
            503,
            "overloaded",
        ),
        (500, b"ActorDiedError: The actor died unexpectedly before finishing this task.", 503, "unavailable"),
        (500, b"Traceback ... /secret/path/file.py line 3", 500, "internal"),
        (408, b"Request abc timed out after 10s.", 408, "timeout"),
    ],
)
def test_errors_the_proxy_makes_itself_become_the_json_error(status, text, want_status, want_kind):
    app = FakeProxy(status, text, b"text/plain; charset=utf-8", [(b"x-request-id", b"rid-1")])
    status_out, headers, body = asyncio.run(_request(ProxyGuard(app, _limits()), [b"x"]))
    got = json.loads(body)
    assert status_out == want_status and got["error"]["kind"] == want_kind and got["request_id"] == "rid-1"
    assert headers["content-type"] == "application/json"
    assert b"/secret" not in body
    if want_status == 503:
        assert headers["retry-after"]


def test_a_request_the_proxy_leaves_unanswered_gets_a_retryable_503():
    """Ray's proxy sends nothing when the ingress replica dies mid-request (uvicorn would say a text 500)."""

    async def silent(scope, receive, send):
        await receive()

    status, headers, body = asyncio.run(_request(ProxyGuard(silent, _limits()), [b"x"]))
    assert status == 503 and headers["retry-after"] == "2" and json.loads(body)["error"]["kind"] == "unavailable"


def test_json_answers_of_the_ingress_pass_unchanged():
    app = FakeProxy(422, b'{"error": {"kind": "silence", "message": "m"}, "request_id": "r"}')
    status, _, body = asyncio.run(_request(ProxyGuard(app, _limits()), [b"x"]))
    assert status == 422 and json.loads(body)["error"]["kind"] == "silence"


def test_without_keys_only_local_clients_are_answered():
    guard = ProxyGuard(FakeProxy(), _limits(local_only=True))
    assert asyncio.run(_request(guard, [], method="GET", path="/healthz", client="10.1.2.3", headers=[]))[0] == 403
    assert asyncio.run(_request(guard, [], method="GET", path="/healthz", client="127.0.0.1", headers=[]))[0] == 200


# ---------------------------------------------------------------- scoring slots


def test_scoring_slots_queue_then_refuse_with_retry_after():
    async def run():
        slots = ScoringSlots(running=2, queued=1, retry_after_s=1.5)
        gate = asyncio.Event()

        async def answer():
            async with slots.slot():
                await gate.wait()

        tasks = [asyncio.create_task(answer()) for _ in range(3)]
        await until(lambda: (slots.busy, slots.waiting) == (2, 1), "two answers running and one waiting")
        with pytest.raises(ApiError) as refused:
            async with slots.slot():
                pass
        gate.set()
        await asyncio.gather(*tasks)
        return refused.value, slots

    refused, slots = asyncio.run(run())
    assert refused.status == 503 and refused.headers["Retry-After"] == "2"
    assert (slots.busy, slots.waiting) == (0, 0)


# ---------------------------------------------------------------- adapters


def _tensor_file(path: Path, shapes: dict[str, list[int]]) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({k: np.zeros(v, dtype=np.float32) for k, v in shapes.items()}, str(path))


def _adapter(d: Path, rank: int, shapes: dict[str, list[int]], config: bytes | None = None) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_bytes(config or json.dumps({"r": rank, "lora_alpha": 32}).encode())
    _tensor_file(d / "adapter_model.safetensors", shapes)
    return d


KEY = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_{}.weight"
DIMS = {"hidden": 128, "q": 128, "kv": 64, "ffn": 256}


def test_weights_that_do_not_match_the_rank_or_the_model_are_refused(tmp_path):
    good = _adapter(tmp_path / "good", 8, {KEY.format("A"): [8, 128], KEY.format("B"): [128, 8]})
    check_lora_dims(check_adapter(good), DIMS)
    wrong_rank = _adapter(tmp_path / "rank", 16, {KEY.format("A"): [8, 128], KEY.format("B"): [128, 8]})
    with pytest.raises(AdapterError, match="does not match rank 16"):
        check_adapter(wrong_rank)
    wrong_model = _adapter(tmp_path / "model", 8, {KEY.format("A"): [8, 96], KEY.format("B"): [128, 8]})
    with pytest.raises(AdapterError, match="base model needs"):
        check_lora_dims(check_adapter(wrong_model), DIMS)
    garbage = _adapter(tmp_path / "garbage", 8, {KEY.format("A"): [8, 128]})
    (garbage / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"junk")
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        check_adapter(garbage)


@pytest.mark.parametrize(
    "config", [b"[1, 2]", b"[" * 100_000 + b"]" * 100_000, b'{"r": ' + b"9" * 5000 + b"}", b'{"r": 1e400}', b"\xff\xfe"]
)
def test_hostile_adapter_configs_are_refused_cleanly(tmp_path, config):
    d = _adapter(tmp_path / "a", 8, {KEY.format("A"): [8, 128], KEY.format("B"): [128, 8]}, config)
    with pytest.raises(AdapterError):
        check_adapter(d)


def test_admin_adapters_must_lie_inside_the_roots_after_symlinks(tmp_path):
    root = tmp_path / "adapters"
    inside = _adapter(root / "v1", 8, {KEY.format("A"): [8, 128], KEY.format("B"): [128, 8]})
    outside = _adapter(tmp_path / "elsewhere", 8, {KEY.format("A"): [8, 128], KEY.format("B"): [128, 8]})
    (root / "link").symlink_to(outside)
    cfg = GraderConfig.model_validate({"model": {"base": "m"}, "parts": {"p": {"adapter": str(inside)}}})
    reg = PartRegistry(cfg, tmp_path / "registry.json")
    assert reg.adapter_roots() == [root.resolve()]
    assert reg.admit("q", PartConfig(adapter=inside)).adapter.path == inside.resolve()
    messages = set()
    for path in (outside, root / "link", Path("/etc"), Path("/no/such/dir"), root / ".." / "elsewhere"):
        with pytest.raises(AdapterError) as e:
            reg.admit("q", PartConfig(adapter=path))
        messages.add(str(e.value))
    assert len(messages) == 1 and "outside" in messages.pop()  # the same answer whether a path exists or not
    with pytest.raises(AdapterError, match="absolute"):
        reg.admit("q", PartConfig(adapter=Path("relative/v1")))


def test_more_levels_than_the_engine_reads_are_refused():
    levels = [{"label": f"L{i}", "cefr": "A1", "score": i, "descriptor": "d"} for i in range(25)]
    with pytest.raises(ValueError, match="at most 20"):
        PartConfig.model_validate({"levels": levels})


def test_caller_ids_are_bounded():
    from pydantic import ValidationError

    from serve.service.protocol import BatchRequest, ScoreRequest

    ScoreRequest(part="p", audio_base64="", response_id="r" * 256)
    with pytest.raises(ValidationError):
        ScoreRequest(part="p", audio_base64="", response_id="r" * 257)
    with pytest.raises(ValidationError):
        BatchRequest(answers=[{"part": "p", "audio_base64": ""}], candidate_id="c" * 257)
