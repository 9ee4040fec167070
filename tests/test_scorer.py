"""The scorer replica without vLLM: its engine comes from a factory, here :class:`tests.fake_engine.FakeEngine`.

First the replica's own logic (adapter release deferred while a request of it
runs), then the real Ray Serve application with the fake engine behind real
HTTP: multiplexing by model id, the LRU of adapters per replica, eviction
while a request of the evicted part is in flight, and back-pressure.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import soundfile as sf
import yaml

from loadtest.service import free_port
from serve.grading.config import load_config
from serve.grading.parts import config_parts
from serve.grading.results import INTERVAL_STATUSES
from serve.service.proxy_guard import proxy_env
from serve.service.routes import ROUTES, Body
from serve.service.scorer import LoadedPart
from serve.service.settings import load_service_config
from serve.service.uploads import UploadLimits
from tests.audio_fixtures import speechlike
from tests.conftest import environment_and_signals_restored, l2grader
from tests.fake_engine import DEAD_ENV, EVENTS_ENV, HOLD_ENV, FakeEngine

REPO = Path(__file__).resolve().parent.parent
APP = "scorer-test"


def wav(seconds: float, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, speechlike(seconds, seed=seed), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cfg_path(tiny_config, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scorer")
    raw = tiny_config()
    raw["parts"]["opinion"] = {"adapter": raw["parts"]["interview"]["adapter"], "task": "Opinion."}
    raw["audio"] = {"max_upload_mb": 2}
    raw["serving"] = {
        "max_batch_answers": 4,
        "max_batch_audio_s": 60,
        "registry_file": str(d / "registry.json"),
        "adapters_per_replica": 1,
        "ingress": {"autoscaling": {"min_replicas": 1, "max_replicas": 1}, "num_cpus": 0},
        "scorer": {
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            "num_cpus": 0,
            "max_ongoing_requests": 3,
            "max_queued_requests": 2,
            "retry_after_s": 2,
        },
    }
    # a candidate calibration named but not fitted yet: test_a_batch_overall_interval_... fits it
    raw["candidate"] = {"calibration": {"path": str(d / "candidates.calibration.json")}}
    (d / "c.yaml").write_text(yaml.safe_dump(raw))
    return d / "c.yaml"


# ---------------------------------------------------------------- the replica's own logic


def test_release_waits_for_the_requests_in_flight(cfg_path):
    cfg = load_config(cfg_path)
    engine = FakeEngine(cfg)
    spec = engine.resolve(config_parts(cfg)["interview"])
    released = []

    async def release(s):
        released.append(s.model_id)
        await engine.unload_adapter(s)

    async def run():
        await engine.load_adapter(spec)
        part = LoadedPart(spec, release)
        entered, leave = asyncio.Event(), asyncio.Event()

        async def request():
            async with part.in_use():
                entered.set()
                await leave.wait()

        task = asyncio.create_task(request())
        await entered.wait()
        await part.__del__()  # what Serve awaits when it drops the part
        assert released == [] and spec.adapter_hash in engine.loaded
        leave.set()
        await task
        assert released == [spec.model_id] and spec.adapter_hash not in engine.loaded
        await part.retire()  # a second drop releases nothing more
        assert released == [spec.model_id]

    asyncio.run(run())


# ---------------------------------------------------------------- the real Serve application, fake engine


@pytest.fixture(scope="module")
def url(cfg_path):
    import ray
    from ray import serve

    from serve.service.app import build_app

    # This process as it was after (Ray's driver sets environment variables and a SIGTERM handler): later tests
    # must not run in the service's environment.
    with environment_and_signals_restored():
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        os.environ[EVENTS_ENV] = str(cfg_path.parent / "engine-events.txt")
        os.environ[HOLD_ENV] = str(cfg_path.parent / "engine-hold.txt")
        os.environ[DEAD_ENV] = str(cfg_path.parent / "engine-dead")
        guard_env = proxy_env(str(cfg_path))  # the proxy guard, as `l2grader serve` runs it (Ray's processes inherit)
        os.environ.update(guard_env)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(
                build_app({"config": str(cfg_path), "engine": "tests.fake_engine:FakeEngine"}),
                name=APP,
                route_prefix="/",
            )
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()


def post(url: str, part: str, seconds: float, seed: int = 0) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/score", data={"part": part}, files={"audio": ("a.wav", wav(seconds, seed))}, timeout=120
    )


def engine_events() -> list[tuple[str, str]]:
    """(event, part) pairs the scorer replica's fake engine recorded: adapter loads and unloads, scoring starts."""
    path = Path(os.environ[EVENTS_ENV])
    words = path.read_text().split() if path.exists() else []
    return list(zip(words[::2], words[1::2]))


def started(part: str) -> int:
    """Requests of ``part`` the fake engine has started to score."""
    return engine_events().count(("score", part))


def wait_for(condition, what: str, timeout_s: float = 120) -> None:
    """Return once ``condition()`` holds (polled); fail naming ``what`` if it does not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} in {timeout_s:g} s"
        time.sleep(0.05)


@contextlib.contextmanager
def held(*parts: str):
    """The fake engine holds every request of ``parts`` before scoring it until the block ends."""
    hold = Path(os.environ[HOLD_ENV])
    hold.write_text("\n".join(parts))
    try:
        yield
    finally:
        hold.unlink()


def scorer_stats() -> dict:
    """Adapter loads and unloads (evictions) by part, as the scorer replica's fake engine recorded them."""
    from collections import Counter

    events = engine_events()
    return {
        "adapter_loads": Counter(p for e, p in events if e == "load"),
        "adapter_evictions": Counter(p for e, p in events if e == "unload"),
    }


def test_parts_are_multiplexed_with_an_lru_of_one_adapter(url):
    before = scorer_stats()
    for part in ("interview", "interview", "long_turn", "interview"):
        r = post(url, part, 2)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["adapter"].startswith(f"{part}@")
    after = scorer_stats()
    loads = {
        p: after["adapter_loads"].get(p, 0) - before.get("adapter_loads", {}).get(p, 0)
        for p in ("interview", "long_turn")
    }
    evictions = {
        p: after["adapter_evictions"].get(p, 0) - before.get("adapter_evictions", {}).get(p, 0)
        for p in ("interview", "long_turn")
    }
    # One slot: interview stays for its second answer, long_turn evicts it, interview evicts long_turn.
    assert loads["long_turn"] == 1 and loads["interview"] in (1, 2)
    assert evictions["long_turn"] == 1


def test_evicting_a_part_with_a_request_in_flight_lets_that_request_finish(url):
    with ThreadPoolExecutor(max_workers=1) as pool:
        with held("opinion"):
            before = started("opinion")
            slow = pool.submit(post, url, "opinion", 20, 1)
            wait_for(lambda: started("opinion") > before, "opinion request in the scorer")
            other = post(url, "long_turn", 2, 2)  # one slot: loading long_turn drops opinion while it is held
            assert other.status_code == 200, other.text
        r = slow.result()
    assert r.status_code == 200, r.text  # the fake engine fails a request whose adapter left mid-flight
    assert r.json()["part"] == "opinion"


def test_back_pressure_answers_503_with_retry_after(url):
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda i: post(url, "interview", 10, 10 + i), range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 3, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "2"
            assert r.json()["error"]["kind"] == "overloaded"
    assert post(url, "interview", 2).status_code == 200  # and it recovers


def test_a_dead_engine_gives_503s_not_ready_and_is_replaced(url):
    """The replica's engine dies under answers in flight: they and the answers after them get a retryable 503
    ``unavailable`` (never 500), /readyz says in words that no scorer can score, and Serve's health check
    replaces the replica, whose fresh engine serves again."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        in_flight = [pool.submit(post, url, "interview", 20, 60 + i) for i in range(3)]  # 2 s each
        time.sleep(0.8)
        Path(os.environ[DEAD_ENV]).write_text("dead")  # the fake engines built before now die
        killed = time.monotonic()
        answers = [f.result() for f in in_flight]
    answers.append(post(url, "interview", 2))
    for r in answers:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["kind"] == "unavailable" and r.headers["retry-after"] == "2"
    ready = httpx.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 503 and ready.headers["retry-after"] == "2"
    assert ready.json()["reason"] == "the scorer's engine stopped; a replacement replica is starting"
    while (r := post(url, "interview", 2)).status_code != 200:
        assert r.status_code == 503 and r.json()["error"]["kind"] == "unavailable", r.text
        assert time.monotonic() - killed < 120, "no replacement replica within 120 s"
        time.sleep(0.5)
    print(f"fake engine killed: a replacement replica scored again after {time.monotonic() - killed:.1f} s")
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200


# ---------------------------------------------------------------- bad and hostile requests: a JSON 4xx each


def assert_error(r: httpx.Response, status: int, kind: str) -> dict:
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert body["error"]["kind"] == kind and body["request_id"], body
    assert "Traceback" not in r.text and "/work/" not in r.text and "pid=" not in r.text
    return body


@pytest.mark.parametrize("fmt", ["webm", "m4a", "mp4", "aac", "mp3", "ogg", "flac"])
def test_formats_browsers_and_phones_record_are_scored(url, fmt):
    from loadtest.audio import encode

    audio = encode(speechlike(6.0, seed=40), 16000, fmt)
    r = httpx.post(f"{url}/v1/score", data={"part": "interview"}, files={"audio": (f"a.{fmt}", audio)}, timeout=60)
    assert r.status_code == 200, r.text
    assert abs(r.json()["duration_s"] - 6.0) < 0.1


def test_malformed_bodies(url):
    assert_error(
        httpx.post(f"{url}/v1/score", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
        422,
        "invalid_request",
    )
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_error(
        httpx.post(f"{url}/v1/score", content=deep, headers={"content-type": "application/json"}),
        422,
        "invalid_request",
    )
    assert_error(
        httpx.post(f"{url}/v1/score", content=b"{}", headers={"content-type": "application/json;;; =x; charset"}),
        422,
        "invalid_request",
    )
    assert_error(
        httpx.post(f"{url}/v1/score", content=b"x", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_error(httpx.get(f"{url}/no/such/path"), 404, "not_found")
    assert_error(httpx.delete(f"{url}/v1/score"), 405, "method_not_allowed")


def test_a_mistyped_part_gets_404_naming_the_part_it_may_have_meant(url):
    body = assert_error(post(url, "intervew", 2), 404, "unknown_part")
    assert body["error"]["message"].startswith("unknown part 'intervew' (did you mean 'interview'? known parts: ")
    batch = {"answers": [{"part": "long-turn", "audio_base64": base64.b64encode(wav(2.0)).decode()}]}
    body = assert_error(httpx.post(f"{url}/v1/score/batch", json=batch, timeout=60), 404, "unknown_part")
    assert "(did you mean 'long_turn'? known parts: " in body["error"]["message"]


def test_mime_base64_with_line_breaks_is_accepted(url):
    b64 = base64.encodebytes(wav(3.0, seed=41)).decode()  # 76-character lines
    assert "\n" in b64
    r = httpx.post(f"{url}/v1/score", json={"part": "interview", "audio_base64": b64}, timeout=60)
    assert r.status_code == 200, r.text


def test_hostile_audio(url):
    from tests.test_audio import _wav_header

    def post_bytes(data: bytes) -> httpx.Response:
        return httpx.post(f"{url}/v1/score", data={"part": "interview"}, files={"audio": ("x.wav", data)}, timeout=60)

    assert_error(post_bytes(_wav_header(1, 1, 800) + b"\x10\x00" * 800), 422, "unsupported_audio")
    assert_error(post_bytes(_wav_header(16000, 64, 1600) + b"\x00\x01" * 64 * 1600), 422, "unsupported_audio")
    loud = speechlike(2.0, seed=42).astype("<f4")
    loud[::400] *= 1e30  # samples far beyond full scale (a speech detector hears a wholly saturated answer as buzz)
    r = post_bytes(_wav_header(16000, 1, len(loud), bits=32, fmt_tag=3) + loud.tobytes())
    assert r.status_code == 200, r.text  # clipped to full scale


def test_a_chunked_body_past_the_limit_is_refused_while_it_streams(url):
    import select
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    piece = b"a" * (1024 * 1024)
    sent_mb, response = 0, b""
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        deadline = time.time() + 60
        while sent_mb < 600 and time.time() < deadline:  # up to 600 MB, 1 MB at a time, no Content-Length
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered
            try:
                sock.sendall(b"100000\r\n" + piece + b"\r\n")
            except OSError:
                break  # or closed the connection
            sent_mb += 1
        sock.settimeout(30)
        try:
            while not response.endswith(b"}"):  # the JSON error body ends the response
                got = sock.recv(65536)
                if not got:
                    break
                response += got
        except OSError:
            pass
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert b'"too_large"' in response
    assert sent_mb < 100, sent_mb  # answered near the 2 MB (+ base64) limit, not after 600 MB


def test_batch_limits(url):
    one = base64.b64encode(wav(20.0, seed=43)).decode()
    too_many = {"answers": [{"part": "interview", "audio_base64": one}] * 5}
    body = assert_error(httpx.post(f"{url}/v1/score/batch", json=too_many, timeout=60), 413, "too_large")
    assert "at most 4" in body["error"]["message"]
    too_long = {"answers": [{"part": "interview", "audio_base64": one}] * 4}  # 80 s > 60 s
    body = assert_error(httpx.post(f"{url}/v1/score/batch", json=too_long, timeout=60), 413, "too_long")
    assert "at most 60 s" in body["error"]["message"]
    ok = {"answers": [{"part": "interview", "audio_base64": one}] * 2}
    assert httpx.post(f"{url}/v1/score/batch", json=ok, timeout=60).status_code == 200


def test_a_batch_overall_interval_comes_from_the_candidate_calibration_once_fitted(url, cfg_path, tmp_path):
    """Over HTTP: with the configured calibration file absent, the overall interval is the parts' union bound and
    says why; fitted by ``l2grader calibrate-candidates`` for this rule and these parts, the next batch's interval
    comes from it (no restart); a broken file falls back again, saying so."""
    import numpy as np

    one = base64.b64encode(wav(6.0, seed=51)).decode()
    batch = {"candidate_id": "c-1", "answers": [{"part": p, "audio_base64": one} for p in ("interview", "long_turn")]}

    def overall() -> dict:
        r = httpx.post(f"{url}/v1/score/batch", json=batch, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["overall"]

    before = overall()
    assert before["candidate_calibration"] == "uncalibrated" and before["interval_detail"]
    assert before["interval"] is None or before["interval"]["method"] == "union_bound"

    rng = np.random.default_rng(5)
    machine = rng.uniform(1.5, 5.5, 40)
    (tmp_path / "machine.csv").write_text(
        "candidate_id,score\n" + "".join(f"k{i},{m:.4f}\n" for i, m in enumerate(machine))
    )
    human = np.clip(machine + rng.normal(0, 0.3, len(machine)), 1, 6)  # human scores are on the scale
    rows = "".join(f"k{i},{h:.4f}\n" for i, h in enumerate(human))
    (tmp_path / "human.csv").write_text("candidate_id,score\n" + rows)
    args = ["--candidates", tmp_path / "machine.csv", "--human", tmp_path / "human.csv", "--allow-small"]
    r = l2grader("calibrate-candidates", "--config", cfg_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    after = overall()
    assert after["candidate_calibration"] == "calibrated", after
    assert after["interval"]["method"] == "candidate_calibration" and after["interval"]["calibrated_on"] == 40
    assert after["interval"]["low"] <= after["score"] <= after["interval"]["high"]
    assert after["score"] == pytest.approx(before["score"])  # the interval's source never moves the score

    (cfg_path.parent / "candidates.calibration.json").write_text("{not json")
    broken = overall()
    assert broken["candidate_calibration"] == "invalid_calibration" and broken["interval_detail"], broken
    assert broken["interval"] is None or broken["interval"]["method"] == "union_bound"
    assert "/" not in broken["interval_detail"]  # no server path in an answer


# ---------------------------------------------------------------- body limits at the proxy guard, every route


def declared_only(url: str, method: str, path: str, length: int) -> httpx.Response:
    """The answer to a request that declares a body of ``length`` bytes and sends none of it."""
    import http.client
    from urllib.parse import urlsplit

    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=30)
    try:
        conn.putrequest(method, path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        r = conn.getresponse()
        return httpx.Response(r.status, headers=r.getheaders(), content=r.read())
    finally:
        conn.close()


def test_every_route_that_takes_a_body_takes_a_real_sized_one_through_the_guard(url, cfg_path):
    """The guard sizes each route's body from the route table: a 6 s answer (the repository's sample, 256 kB in
    base64) reaches every POST and PUT route (the JSON answer's once met the 64 kB default), and a body past a
    route's limit still gets the JSON 413 at the guard."""
    wav_bytes = (REPO / "docs" / "sample-answer.wav").read_bytes()
    b64 = base64.b64encode(wav_bytes).decode()
    assert len(b64) > 200_000
    adapter = str(load_config(cfg_path).parts["interview"].adapter)
    limits = UploadLimits(load_service_config(cfg_path))

    def real_sized(route) -> list[dict]:
        """Requests of a real size for the route: its answers, or a registration as large as one answer."""
        return {
            Body.ANSWER: [
                {"data": {"part": "interview"}, "files": {"audio": ("a.wav", wav_bytes)}},
                {"json": {"part": "interview", "audio_base64": b64}},
            ],
            Body.BATCH: [{"json": {"answers": [{"part": "interview", "audio_base64": b64}] * 2}}],
            Body.PART: [{"json": {"adapter": adapter, "task": "Describe it. " * (len(b64) // 13)}}],
        }[route.body]

    tried = []
    for route in ROUTES:
        if route.method not in ("POST", "PUT", "PATCH"):
            continue
        path = route.path.replace("{part}", "sized")
        for request in real_sized(route):
            r = httpx.request(route.method, f"{url}{path}", timeout=120, **request)
            assert r.status_code == 200, f"{route.method} {path}: {r.text[:300]}"
            tried.append((route.method, route.path))
        too_large = limits.body_limit(route.method, path) + 1
        body = assert_error(declared_only(url, route.method, path, too_large), 413, "too_large")
        assert (
            f"body of {too_large} bytes exceeds" in body["error"]["message"]
            and "accepted here" in body["error"]["message"]
        )
    httpx.delete(f"{url}/v1/parts/sized", timeout=30)
    assert {"/v1/score", "/v1/score/json", "/v1/score/batch", "/v1/parts/{part}"} <= {p for _, p in tried}


# ---------------------------------------------------------------- the OpenAPI document, held against the service

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import status_code_conformance  # noqa: E402


def test_the_document_declares_both_score_bodies(url):
    doc = httpx.get(f"{url}/openapi.json").json()
    score, as_json = doc["paths"]["/v1/score"]["post"], doc["paths"]["/v1/score/json"]["post"]
    assert set(score["requestBody"]["content"]) == {"multipart/form-data"}
    assert set(as_json["requestBody"]["content"]) == {"application/json"}
    for op in (score, as_json):
        assert {"401", "404", "413", "415", "422", "503"} <= set(op["responses"])
    assert "application/json" in doc["paths"]["/v1/score/batch"]["post"]["requestBody"]["content"]


def test_the_document_declares_metrics_as_prometheus_text_and_readiness_with_its_body(url):
    from serve.service.protocol import ReadyResponse

    doc = httpx.get(f"{url}/openapi.json").json()
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]
    assert set(metrics["content"]) == {"text/plain"} and metrics["content"]["text/plain"]["schema"]["type"] == "string"
    answered = httpx.get(f"{url}/metrics", timeout=30)
    assert answered.status_code == 200 and answered.headers["content-type"].startswith("text/plain")
    ready = doc["paths"]["/readyz"]["get"]["responses"]
    for status in ("200", "503"):
        assert ready[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ReadyResponse"}
    assert "reason" in doc["components"]["schemas"]["ReadyResponse"]["properties"]
    body = httpx.get(f"{url}/readyz", timeout=30).json()
    assert ReadyResponse.model_validate(body).ready and body["untrained"] is True
    # each registered part's interval status, as its answers will carry it; the why (with paths) for admins only
    assert body["intervals"] and set(body["intervals"].values()) <= set(INTERVAL_STATUSES)
    assert ("interval_details" in body) == ("base_model" in body)  # both for admins only


def test_generated_requests_get_no_5xx_and_only_documented_statuses(url):
    """Requests generated from the document itself (schemathesis): no 5xx, no status the document leaves out.

    Admin routes are left out: generated PUT/DELETE calls would change the parts the other tests score.
    """
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    tested = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() in ("PUT", "DELETE"):
            continue

        @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            case.call_and_validate(base_url=url, checks=[not_a_server_error, status_code_conformance], timeout=60)

        check()
        tested.append(operation.label)
    assert {"POST /v1/score", "POST /v1/score/json", "POST /v1/score/batch", "GET /v1/parts"} <= set(tested)


# ---------------------------------------------------------------- Locust against the overloaded scorer


def test_loadtest_counts_overload_503s_with_retry_after_and_does_not_fail_the_run(url, cfg_path, tmp_path):
    """``l2grader loadtest`` (real Locust) against this scorer, which takes 3 answers and queues 2: the rest are
    503s with Retry-After, which a load test expects of an overloaded service."""
    out = tmp_path / "run"
    run = l2grader(
        "loadtest",
        "--config",
        cfg_path,
        "--url",
        url,
        "--users",
        "16",
        "--duration",
        "15",
        "--wait",
        "0",
        "--pool",
        "2",
        "--mix",
        "short:100",
        "--out",
        out,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(summary["errors"]) == {"503"} and summary["errors"]["503"] > 0, summary
    assert summary["answers"] > 0  # the scorer kept scoring what it admitted
    assert "Retry-After 2" in (out / "locust_failures.csv").read_text()


# ---------------------------------------------------------------- part versions: drain on DELETE, content identity


def _admin_put(url: str, part: str, adapter: Path) -> httpx.Response:
    return httpx.put(f"{url}/v1/parts/{part}", json={"adapter": str(adapter)}, timeout=120)


def decoded_answers(url: str) -> float:
    """Answers the ingress has decoded, from /metrics (replicas report every 2 s): an answer is decoded after its
    part's version was fixed."""
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("ray_l2grader_decode_seconds_count"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_answers_accepted_before_a_delete_are_scored_with_their_version(url, cfg_path):
    adapter = load_config(cfg_path).parts["interview"].adapter
    assert _admin_put(url, "drain", adapter).status_code == 200
    with ThreadPoolExecutor(max_workers=5) as pool:
        with held("interview"):
            # Three answers fill the scorer (3 at once), held there; two of "drain" then wait in Serve's queue.
            scoring, drained, decoded = started("interview"), started("drain"), decoded_answers(url)
            busy = [pool.submit(post, url, "interview", 2, 40 + i) for i in range(3)]
            wait_for(lambda: started("interview") >= scoring + 3, "three interview answers in the scorer")
            accepted = [pool.submit(post, url, "drain", 2, 50 + i) for i in range(2)]
            wait_for(lambda: decoded_answers(url) >= decoded + 5, "drain answers decoded by the ingress")
            deleted = httpx.delete(f"{url}/v1/parts/drain", timeout=30)
            assert started("drain") == drained  # the scorer has not seen these answers before the delete
        answers = [f.result() for f in accepted + busy]
    assert deleted.status_code == 200, deleted.text
    assert [r.status_code for r in answers] == [200] * 5, [r.text[:300] for r in answers]
    assert [r.json()["part"] for r in answers[:2]] == ["drain", "drain"]
    assert_error(post(url, "drain", 2), 404, "unknown_part")


def test_an_adapter_changed_in_place_is_refused_until_registered_again(url, cfg_path):
    import shutil

    source = load_config(cfg_path).parts["interview"].adapter
    copy = source.parent / f"inplace-{os.getpid()}"
    shutil.copytree(source, copy)
    try:
        first = _admin_put(url, "inplace", copy)
        assert first.status_code == 200, first.text
        scored = post(url, "inplace", 2)
        assert scored.status_code == 200 and scored.json()["model"]["adapter_hash"] == first.json()["adapter_hash"]
        weights = copy / "adapter_model.safetensors"
        st = weights.stat()
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # same size; then the old modification time put back
        weights.write_bytes(bytes(data))
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert post(url, "long_turn", 2).status_code == 200  # one adapter per replica: this evicts "inplace"
        refused = post(url, "inplace", 2)
        err = assert_error(refused, 503, "adapter_changed")
        assert "PUT /v1/parts/inplace" in err["error"]["message"] and str(copy) not in refused.text
        again = _admin_put(url, "inplace", copy)
        assert again.status_code == 200 and again.json()["model_id"] != first.json()["model_id"]
        rescored = post(url, "inplace", 2)
        assert rescored.status_code == 200 and rescored.json()["model"]["adapter_hash"] == again.json()["adapter_hash"]
        assert str(copy.parent) not in rescored.text  # the answer names the model, not where it lies
    finally:
        httpx.delete(f"{url}/v1/parts/inplace", timeout=30)
        shutil.rmtree(copy)


# ---------------------------------------------------------------- aspects at the admin door


def test_aspects_of_an_admitted_part_are_checked_like_its_adapter(url, cfg_path):
    adapter = str(load_config(cfg_path).parts["interview"].adapter)

    def put(body: dict) -> httpx.Response:
        return httpx.put(f"{url}/v1/parts/aspect-door", json=body, timeout=120)

    # An aspect's own adapter outside the adapter roots gets the answer a part's adapter there gets.
    part_outside = assert_error(put({"adapter": "/etc"}), 422, "invalid_adapter")
    for path in ("/etc", "/no/such/adapter", f"{adapter}/../../../../etc"):
        body = {"adapter": adapter, "aspects": {"fluency": {"adapter": path}}}
        aspect_outside = assert_error(put(body), 422, "invalid_adapter")
        assert "outside the folders adapters may come from" in aspect_outside["error"]["message"]
        assert "fluency" in aspect_outside["error"]["message"] and path not in json.dumps(aspect_outside)
    assert "outside the folders adapters may come from" in part_outside["error"]["message"]
    # Too many aspects, ids that are not ids, an aspect not built in without its description or levels: 422 JSON.
    many = {f"a{i}": {"description": "d"} for i in range(9)}
    assert_error(put({"adapter": adapter, "aspects": many}), 422, "invalid_request")
    for bad in ("a b", "x" * 70, "../fluency", ""):
        r = put({"adapter": adapter, "aspects": {bad: {}}})
        assert_error(r, 422, "invalid_request")
        assert "aspect id" in r.json()["error"]["message"], r.text[:300]
    for body in ({"vocabulary_range": {}}, {"vocabulary_range": {"description": "Range of words."}}):
        r = put({"adapter": adapter, "aspects": body})
        assert_error(r, 422, "invalid_request")
        assert "vocabulary_range" in r.json()["error"]["message"], r.text[:300]
    r = put({"adapter": adapter, "aspects": ["fluency", "vocabulary_range"]})
    assert_error(r, 422, "invalid_request")
    assert "vocabulary_range" in r.json()["error"]["message"]
    parts = {p["part"] for p in httpx.get(f"{url}/v1/parts", timeout=30).json()["parts"]}
    assert "aspect-door" not in parts  # nothing refused was registered


# ---------------------------------------------------------------- calibrations at the HTTP door


def test_a_calibration_serves_its_set_up_only_and_a_required_one_fails_closed(url, cfg_path):
    """An answer carries the interval of a calibration made for its part's exact set-up; after the part's task is
    changed it says stale_calibration (and /readyz names the part so); with interval.require it is refused."""
    import shutil

    import numpy as np

    from serve.grading import calibration
    from serve.grading.adapter_files import check_adapter
    from serve.grading.config import PartConfig
    from serve.grading.fingerprint import score_fingerprint

    cfg = load_service_config(cfg_path)
    copy = cfg.parts["interview"].adapter.parent / f"calibrated-{os.getpid()}"
    shutil.copytree(cfg.parts["interview"].adapter, copy)
    body = {"adapter": str(copy), "task": "Part 1, interview."}
    fp = score_fingerprint(
        PartConfig(**body), check_adapter(copy).content_hash, base=cfg.model.base, audio=cfg.audio, engine=cfg.engine
    )
    rng = np.random.default_rng(0)
    human = rng.uniform(1, 6, 300)
    cal = calibration.fit(
        "calibrated", fp, (1.0, 6.0), range(1, 7), human, human + rng.normal(0, 0.5, 300), [0.5] * 300
    )
    calibration.write(cal, copy)
    try:
        assert httpx.put(f"{url}/v1/parts/calibrated", json=body, timeout=120).status_code == 200
        got = post(url, "calibrated", 2).json()
        assert got["interval_status"] == "calibrated" and got["interval"]["method"] == "mondrian", got
        assert got["interval"]["calibrated_on"] == 300
        assert httpx.get(f"{url}/readyz", timeout=30).json()["intervals"]["calibrated"] == "calibrated"
        edited = {**body, "task": "Part 1, interview: short questions about the candidate."}
        assert httpx.put(f"{url}/v1/parts/calibrated", json=edited, timeout=120).status_code == 200
        got = post(url, "calibrated", 2).json()
        assert got["interval"] is None and got["interval_status"] == "stale_calibration", got
        ready = httpx.get(f"{url}/readyz", timeout=30).json()
        assert ready["intervals"]["calibrated"] == "stale_calibration"
        if "interval_details" in ready:  # admins: which component changed
            assert "prompt" in ready["interval_details"]["calibrated"]
        required = {**edited, "interval": {"require": True}}
        refused = httpx.put(f"{url}/v1/parts/calibrated", json=required, timeout=120)
        err = assert_error(refused, 422, "invalid_adapter")
        assert "requires a valid calibration" in err["error"]["message"] and "prompt" in err["error"]["message"]
        assert post(url, "calibrated", 2).json()["interval_status"] == "stale_calibration"  # the old version serves
    finally:
        httpx.delete(f"{url}/v1/parts/calibrated", timeout=30)
        shutil.rmtree(copy)
