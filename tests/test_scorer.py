"""The scorer replica without vLLM: its engine comes from a factory, here :class:`tests.fake_engine.FakeEngine`.

First the replica's own logic (adapter release deferred while a request of it
runs), then the real Ray Serve application with the fake engine behind real
HTTP: multiplexing by model id, the LRU of adapters per replica, eviction
while a request of the evicted part is in flight, and back-pressure.
"""

from __future__ import annotations

import asyncio
import io
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
from serve.service.scorer import LoadedPart
from tests.audio_fixtures import speechlike
from tests.fake_engine import FakeEngine

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
    raw["serving"] = {
        "registry_file": str(d / "registry.json"),
        "adapters_per_replica": 1,
        "ingress": {"autoscaling": {"min_replicas": 1, "max_replicas": 1}, "num_cpus": 0},
        "scorer": {"autoscaling": {"min_replicas": 1, "max_replicas": 1}, "num_cpus": 0,
                   "max_ongoing_requests": 3, "max_queued_requests": 2, "retry_after_s": 2},
    }
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

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"config": str(cfg_path), "engine": "tests.fake_engine:FakeEngine"}), name=APP,
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url: str, part: str, seconds: float, seed: int = 0) -> httpx.Response:
    return httpx.post(f"{url}/v1/score", data={"part": part}, files={"audio": ("a.wav", wav(seconds, seed))},
                      timeout=120)


def scorer_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Scorer", APP).get_stats.remote().result()


def test_parts_are_multiplexed_with_an_lru_of_one_adapter(url):
    before = scorer_stats()
    for part in ("interview", "interview", "long_turn", "interview"):
        r = post(url, part, 2)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["adapter"].startswith(f"{part}@")
    after = scorer_stats()
    loads = {p: after["adapter_loads"].get(p, 0) - before.get("adapter_loads", {}).get(p, 0) for p in ("interview", "long_turn")}
    evictions = {p: after["adapter_evictions"].get(p, 0) - before.get("adapter_evictions", {}).get(p, 0)
                 for p in ("interview", "long_turn")}
    # One slot: interview stays for its second answer, long_turn evicts it, interview evicts long_turn.
    assert loads["long_turn"] == 1 and loads["interview"] in (1, 2)
    assert evictions["long_turn"] == 1


def test_evicting_a_part_with_a_request_in_flight_lets_that_request_finish(url):
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(post, url, "opinion", 20, 1)  # 2 s in the fake engine
        time.sleep(0.8)
        other = post(url, "long_turn", 2, 2)  # one slot: loading long_turn drops opinion
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
