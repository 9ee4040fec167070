"""The real service (Ray Serve on loopback, vLLM on the tiny checkpoint) through real HTTP.

The application starts once for this module, with API keys configured, and
every endpoint and bad input is exercised against it.
"""

from __future__ import annotations

import base64
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import yaml

from tests.audio_fixtures import speechlike, write
from tests.conftest import ADMIN, L2GRADER, USER, keyed_service_config, require_espeak, running_service

pytestmark = pytest.mark.engine

@pytest.fixture(scope="module")
def service_cfg(tiny_config, tmp_path_factory) -> Path:
    raw = tiny_config()
    raw["audio"] = {"max_upload_mb": 24, "max_duration_s": 660}
    return keyed_service_config(raw, tmp_path_factory.mktemp("service"))


@pytest.fixture(scope="module")
def base_url(service_cfg, tmp_path_factory):
    port = yaml.safe_load(service_cfg.read_text())["serving"]["port"]
    with running_service(service_cfg, port, tmp_path_factory.mktemp("log") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def long_files(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("long")
    return [write(d / "five.wav", 5, 16000, seed=21), write(d / "minute.ogg", 61, 48000, seed=22),
            write(d / "two.mp3", 130, 22050, seed=23), write(d / "ten.flac", 600, 16000, seed=24)]


@pytest.fixture(scope="module")
def trust_files(tmp_path_factory) -> dict[str, Path]:
    """One synthesized answer (espeak-ng) clean, clipped, and under white noise at 0 dB SNR."""
    import random

    from adapters.synth import add_noise, clip, make_spec, speak

    require_espeak()
    d = tmp_path_factory.mktemp("trust")
    clean = np.concatenate([speak(make_spec(4.0, random.Random(seed))) for seed in (1, 2)])
    waves = {"clean": clean, "clipped": clip(clean, 10.0), "noisy": add_noise(clean, 0.0, np.random.default_rng(0))}
    for name, wave in waves.items():
        sf.write(d / f"{name}.wav", wave, 16000, subtype="PCM_16")
    return {name: d / f"{name}.wav" for name in waves}


@pytest.fixture(scope="module")
def offline(service_cfg, audio_dir, long_files, trust_files) -> dict[str, dict]:
    """``l2grader score`` (one engine) of every file the service's results are compared with, by file name."""
    files = [audio_dir / "a.wav", audio_dir / "b.flac", audio_dir / "c.ogg", audio_dir / "d.mp3", *long_files,
             *trust_files.values()]
    cli = subprocess.run([L2GRADER, "score", "--config", str(service_cfg), "--part", "interview", *map(str, files)],
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    return {Path(x["file"]).name: x for x in map(json.loads, cli.stdout.splitlines())}


def post_file(url, path: Path, part="interview", headers=USER, **form):
    with open(path, "rb") as f:
        return httpx.post(f"{url}/v1/score", data={"part": part, **form}, files={"audio": (path.name, f)},
                          headers=headers, timeout=300)


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_health_ready_docs(base_url):
    assert httpx.get(f"{base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{base_url}/readyz").json()
    assert ready["ready"] is True and ready["untrained"] is True
    assert httpx.get(f"{base_url}/docs").status_code == 200
    paths = httpx.get(f"{base_url}/openapi.json").json()["paths"]
    assert {"/v1/score", "/v1/score/batch", "/v1/parts", "/v1/parts/{part}"} <= set(paths)


def test_scores_equal_the_offline_cli(base_url, offline, audio_dir, long_files):
    files = [audio_dir / "a.wav", audio_dir / "b.flac", audio_dir / "c.ogg", audio_dir / "d.mp3", *long_files]
    for path in files:
        r = post_file(base_url, path, response_id=f"resp-{path.stem}")
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["response_id"] == f"resp-{path.stem}" and got["request_id"] and got["latency_ms"] > 0
        assert r.headers["x-request-id"] == got["request_id"]
        want = offline[path.name]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
        assert got["label_mass"] == pytest.approx(want["label_mass"], abs=1e-5)
        assert len(got["chunks"]) == len(want["chunks"])
    assert len(offline["ten.flac"]["chunks"]) == 20


def test_clipped_and_noisy_speech_are_sent_to_review(base_url, offline, trust_files):
    """`l2grader score` and POST /v1/score: uncertainty, quality, label mass and review on every answer;
    clipping and low SNR are caught, clean speech has neither."""
    before = httpx.get(f"{base_url}/metrics").text
    for name, path in trust_files.items():
        r = post_file(base_url, path)
        assert r.status_code == 200, r.text
        for got in (r.json(), offline[path.name]):
            assert 0 < got["label_mass"] <= 1 and got["uncertainty"]["label_mass"] == got["label_mass"]
            assert set(got["uncertainty"]) == {"score_sd", "entropy", "label_mass", "chunk_spread"}
            assert 0 <= got["uncertainty"]["entropy"] <= 1 and got["uncertainty"]["score_sd"] >= 0
            assert set(got["quality"]) == {"speech_s", "speech_ratio", "snr_db", "clipped_fraction", "speech_dbfs"}
            assert all(0 < c["label_mass"] <= 1 for c in got["chunks"])
            reasons = got["review"]["reasons"]
            assert got["review"]["needed"] == bool(reasons)
            assert ("clipping" in reasons) == (name == "clipped"), (name, got["quality"], reasons)
            assert ("low_snr" in reasons) == (name == "noisy"), (name, got["quality"], reasons)
        assert r.json()["review"] == offline[path.name]["review"]
        assert r.json()["quality"] == offline[path.name]["quality"]
    after = httpx.get(f"{base_url}/metrics").text
    for reason in ("clipping", "low_snr"):
        grown = (metric(after, "l2grader_review_reasons_total", part="interview", reason=reason)
                 - metric(before, "l2grader_review_reasons_total", part="interview", reason=reason))
        assert grown == 1, reason
    verdicts = sum(metric(after, "l2grader_review_verdicts_total", part="interview", needed=v)
                   - metric(before, "l2grader_review_verdicts_total", part="interview", needed=v) for v in ("true", "false"))
    assert verdicts == 3


def test_batch_scores_the_answers_it_can(base_url, audio_dir, trust_files):
    """One silent answer of three: 200, two scored, one not_scorable, the overall over the two, for review."""
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    before = httpx.get(f"{base_url}/metrics").text
    batch = {"candidate_id": "cand-2", "answers": [
        {"part": "interview", "audio_base64": b64(trust_files["clean"]), "response_id": "q1"},
        {"part": "long_turn", "audio_base64": b64(audio_dir / "silent.wav"), "response_id": "q2"},
        {"part": "long_turn", "audio_base64": b64(audio_dir / "a.wav"), "response_id": "q3"}]}
    r = httpx.post(f"{base_url}/v1/score/batch", json=batch, headers=USER, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["status"] for x in body["results"]] == ["scored", "not_scorable", "scored"]
    silent = body["results"][1]
    assert silent["response_id"] == "q2" and silent["part"] == "long_turn"
    assert silent["reason"]["kind"] == "silence" and "silent" in silent["reason"]["message"]
    overall = body["overall"]
    assert overall["scored"] == 2 and overall["not_scorable"] == 1
    assert overall["score"] == pytest.approx(np.mean([body["results"][0]["score"], body["results"][2]["score"]]))
    assert overall["review"]["needed"] and "not_scorable" in overall["review"]["reasons"]
    after = httpx.get(f"{base_url}/metrics").text
    grown = (metric(after, "l2grader_review_reasons_total", part="long_turn", reason="not_scorable")
             - metric(before, "l2grader_review_reasons_total", part="long_turn", reason="not_scorable"))
    assert grown == 1
    # the single-answer endpoint keeps its 422, and a batch of only bad audio still answers
    assert post_file(base_url, audio_dir / "silent.wav").status_code == 422
    only_bad = {"answers": [{"part": "interview", "audio_base64": b64(audio_dir / "corrupt.wav")}]}
    r = httpx.post(f"{base_url}/v1/score/batch", json=only_bad, headers=USER, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["overall"] == {"score": None, "cefr": None, "scored": 0, "not_scorable": 1,
                                   "review": {"needed": True, "reasons": ["not_scorable"]}}
    assert r.json()["results"][0]["reason"]["kind"] == "undecodable"


def test_json_base64_and_batch(base_url, audio_dir):
    audio = base64.b64encode((audio_dir / "a.wav").read_bytes()).decode()
    r = httpx.post(f"{base_url}/v1/score", json={"part": "long_turn", "audio_base64": audio}, headers=USER, timeout=120)
    assert r.status_code == 200, r.text
    single = r.json()
    assert single["part"] == "long_turn" and single["response_id"] is None
    batch = {"candidate_id": "cand-1", "answers": [
        {"part": "interview", "audio_base64": audio, "response_id": "q1"},
        {"part": "long_turn", "audio_base64": audio, "response_id": "q2"}]}
    r = httpx.post(f"{base_url}/v1/score/batch", json=batch, headers=USER, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["response_id"] for x in body["results"]] == ["q1", "q2"]
    assert body["results"][1]["score"] == pytest.approx(single["score"], abs=1e-5)
    assert body["overall"]["score"] == pytest.approx(np.mean([x["score"] for x in body["results"]]))
    assert body["overall"]["cefr"] in {"A1", "A2", "B1", "B2", "C1", "C2"}


def test_64_concurrent_requests_across_two_parts(base_url, tmp_path):
    files = [write(tmp_path / f"c{i}.wav", 8 + i % 5, 16000, seed=100 + i) for i in range(8)]
    jobs = [(files[i % 8], ("interview", "long_turn")[i % 2]) for i in range(64)]
    with ThreadPoolExecutor(max_workers=64) as pool:
        responses = list(pool.map(lambda job: post_file(base_url, job[0], part=job[1]), jobs))
    assert [r.status_code for r in responses] == [200] * 64
    assert {r.json()["part"] for r in responses} == {"interview", "long_turn"}


def test_register_score_and_delete_a_part(base_url, tiny_dir, tmp_path, audio_dir, service_cfg):
    from transformers import Qwen2AudioForConditionalGeneration

    from adapters.tiny_model import make_demo_adapter

    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_dir / "model")
    adapter = make_demo_adapter(model, tmp_path / "opinion_v1", "opinion", seed=777)
    body = {"adapter": str(adapter), "task": "Part 5, opinion: the candidate gives opinions."}
    assert httpx.put(f"{base_url}/v1/parts/opinion", json=body, headers=USER).status_code == 403
    r = httpx.put(f"{base_url}/v1/parts/opinion", json=body, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model_id"].startswith("opinion@")
    registry = json.loads(Path(yaml.safe_load(service_cfg.read_text())["serving"]["registry_file"]).read_text())
    assert registry["opinion"]["adapter"] == str(adapter)  # persisted for restarts
    parts = {p["part"] for p in httpx.get(f"{base_url}/v1/parts", headers=USER).json()["parts"]}
    assert parts == {"interview", "long_turn", "opinion"}

    scored = post_file(base_url, audio_dir / "a.wav", part="opinion")
    assert scored.status_code == 200, scored.text
    assert scored.json()["model"]["adapter"] == r.json()["model_id"]
    interview = post_file(base_url, audio_dir / "a.wav", part="interview").json()
    assert scored.json()["probabilities"] != pytest.approx(interview["probabilities"], abs=1e-3)

    bad = httpx.put(f"{base_url}/v1/parts/broken", json={"adapter": str(tmp_path / "nowhere")}, headers=ADMIN)
    assert bad.status_code == 422 and "does not exist" in bad.json()["error"]["message"]

    assert httpx.delete(f"{base_url}/v1/parts/opinion", headers=ADMIN).status_code == 200
    gone = post_file(base_url, audio_dir / "a.wav", part="opinion")
    assert gone.status_code == 404 and gone.json()["error"]["kind"] == "unknown_part"
    assert httpx.delete(f"{base_url}/v1/parts/opinion", headers=ADMIN).status_code == 404


def test_bad_inputs_get_their_status_and_are_counted(base_url, audio_dir, tmp_path):
    before = httpx.get(f"{base_url}/metrics").text
    blip = np.zeros(16000 * 4, dtype=np.float32)
    blip[:4000] = speechlike(0.25)
    sf.write(tmp_path / "blip.wav", blip, 16000)
    huge = tmp_path / "huge.wav"
    huge.write_bytes(b"\0" * (25 * 1024 * 1024))
    long = write(tmp_path / "long.flac", 700, 8000, seed=5)
    cases = [
        (post_file(base_url, audio_dir / "a.wav", part="no_such_part"), 404, "unknown_part"),
        (httpx.post(f"{base_url}/v1/score", data={"part": "interview"}, files={"x": ("a", b"1")}, headers=USER), 422, "invalid_request"),
        (httpx.post(f"{base_url}/v1/score", json={"audio_base64": "AAAA"}, headers=USER), 422, "invalid_request"),
        (post_file(base_url, audio_dir / "corrupt.wav"), 422, "undecodable"),
        (post_file(base_url, audio_dir / "empty.wav"), 422, "empty"),
        (post_file(base_url, audio_dir / "silent.wav"), 422, "silence"),
        (post_file(base_url, tmp_path / "blip.wav"), 422, "silence"),
        (post_file(base_url, huge), 413, "too_large"),
        (post_file(base_url, long), 413, "too_long"),
        (httpx.post(f"{base_url}/v1/score", content=b"hello", headers={**USER, "content-type": "text/plain"}), 415, "unsupported_media_type"),
    ]
    for response, status, kind in cases:
        assert response.status_code == status, (kind, response.text)
        err = response.json()
        assert err["error"]["kind"] == kind and err["error"]["message"] and err["request_id"]
    assert "too short to score" in cases[6][0].json()["error"]["message"]

    assert post_file(base_url, audio_dir / "c.ogg").status_code == 200  # the replica is still alive
    after = httpx.get(f"{base_url}/metrics").text
    for kind, n in [("unknown_part", 1), ("invalid_request", 2), ("undecodable", 1), ("empty", 1), ("silence", 2),
                    ("too_large", 1), ("too_long", 1), ("unsupported_media_type", 1)]:
        assert metric(after, "l2grader_errors_total", kind=kind) - metric(before, "l2grader_errors_total", kind=kind) == n, kind
    assert metric(after, "l2grader_audio_seconds_scored_total", part="interview") > 0
    assert metric(after, "l2grader_adapter_loads", part="interview") >= 1
    assert "l2grader_request_latency_seconds_bucket" in after and "l2grader_inflight_requests" in after


def test_api_keys(base_url, audio_dir):
    assert post_file(base_url, audio_dir / "a.wav", headers={}).status_code == 401
    assert post_file(base_url, audio_dir / "a.wav", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{base_url}/v1/parts").status_code == 401
    assert httpx.delete(f"{base_url}/v1/parts/interview", headers=USER).status_code == 403
    assert post_file(base_url, audio_dir / "a.wav", headers=ADMIN).status_code == 200


def test_recorded_formats_score_like_the_wav(base_url, service_cfg, tmp_path):
    from loadtest.audio import encode

    # Recorded at 48 kHz, as browsers and phones record. The tiny model has random weights, so how far
    # codec loss moves its score says little; 0.15 holds for this answer (other answers: up to 0.34 for AAC).
    wave = speechlike(12.0, 48000, seed=31)
    scores = {}
    for fmt in ("wav", "webm", "m4a", "mp4", "aac", "mp3"):
        path = tmp_path / f"answer.{fmt}"
        path.write_bytes(encode(wave, 48000, fmt))
        r = post_file(base_url, path)
        assert r.status_code == 200, (fmt, r.text)
        scores[fmt] = r.json()["score"]
    cli = subprocess.run([L2GRADER, "score", "--config", str(service_cfg), "--part", "interview",
                          *(str(tmp_path / f"answer.{f}") for f in scores)], capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    offline = {Path(x["file"]).suffix[1:]: x["score"] for x in map(json.loads, cli.stdout.splitlines())}
    for fmt, score in scores.items():
        assert offline[fmt] == pytest.approx(score, abs=1e-5)  # the same decoding in both paths
        assert score == pytest.approx(scores["wav"], abs=0.15), (fmt, scores)  # codec loss only


def test_malformed_authorization_headers_are_401(base_url, audio_dir):
    for value in ("Bearer cl\u00e9-\u00fc", "Bearer", "Basic abc", "bearer" + "x" * 5000):
        r = httpx.get(f"{base_url}/v1/parts", headers={"Authorization": value.encode("utf-8")})
        assert r.status_code == 401, (value[:20], r.text)
        assert r.json()["error"]["kind"] == "unauthorized"
