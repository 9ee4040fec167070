"""The real service (Ray Serve on loopback, vLLM on the tiny checkpoint) through real HTTP.

The application is the run's one real service (``real_service`` in
tests/conftest.py, API keys configured), and every endpoint and bad input is
exercised against it.
"""

from __future__ import annotations

import base64
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import yaml

from serve.grading.results import Quality
from tests.audio_fixtures import speechlike, write
from tests.conftest import ADMIN, SERVICE_BODY_TIMEOUT_S, USER, l2grader, require_espeak
from tests.test_hardening import until

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def base_url(real_service) -> str:
    return real_service.url


@pytest.fixture(scope="module")
def service_cfg(real_service) -> Path:
    return real_service.config


@pytest.fixture(scope="module")
def service_log(real_service) -> Path:
    """What ``l2grader serve`` printed (Ray's own lines and the service's start-up lines)."""
    return real_service.log


@pytest.fixture(scope="module")
def adapter_root(real_service) -> Path:
    """Where this module's admin calls may take adapters from, beside the tiny checkpoint's."""
    return real_service.adapter_root


@pytest.fixture(scope="module")
def long_files(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("long")
    return [
        write(d / "five.wav", 5, 16000, seed=21),
        write(d / "minute.ogg", 61, 48000, seed=22),
        write(d / "two.mp3", 130, 22050, seed=23),
        write(d / "ten.flac", 600, 16000, seed=24),
    ]


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


RECORDED_FORMATS = ("wav", "webm", "m4a", "mp4", "aac", "mp3")


@pytest.fixture(scope="module")
def recorded_files(tmp_path_factory) -> dict[str, Path]:
    """One 12 s answer recorded at 48 kHz, as browsers and phones record, in each format they send."""
    from loadtest.audio import encode

    d = tmp_path_factory.mktemp("recorded")
    wave = speechlike(12.0, 48000, seed=31)
    files = {fmt: d / f"recorded.{fmt}" for fmt in RECORDED_FORMATS}
    for fmt, path in files.items():
        path.write_bytes(encode(wave, 48000, fmt))
    return files


@pytest.fixture(scope="module")
def offline(service_cfg, audio_dir, long_files, trust_files, recorded_files) -> dict[str, dict]:
    """``l2grader score`` (one engine) of every file the service's results are compared with, by file name."""
    files = [
        audio_dir / "a.wav",
        audio_dir / "b.flac",
        audio_dir / "c.ogg",
        audio_dir / "d.mp3",
        *long_files,
        *trust_files.values(),
        *recorded_files.values(),
    ]
    cli = l2grader("score", "--config", service_cfg, "--part", "interview", *files, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    return {Path(x["file"]).name: x for x in map(json.loads, cli.stdout.splitlines())}


def post_file(url, path: Path, part="interview", headers=USER, **form):
    with open(path, "rb") as f:
        return httpx.post(
            f"{url}/v1/score",
            data={"part": part, **form},
            files={"audio": (path.name, f)},
            headers=headers,
            timeout=300,
        )


def metric(text: str, name: str, **labels) -> float:
    """The sum of a metric's series on a /metrics page (Ray's export: the service's names with the prefix ``ray_``)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"ray_{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def settled_metrics(url: str, timeout_s: float = 60) -> str:
    """/metrics once the service's counters stopped moving (replicas report to Ray every 2 s)."""

    def counters(text):
        return sorted(line for line in text.splitlines() if line.startswith("ray_l2grader_") and "_total{" in line)

    seen = None
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"{url}/metrics").text
        if counters(text) == seen or time.monotonic() > deadline:
            return text
        seen = counters(text)
        time.sleep(3)


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


def test_the_other_demo_part_scores_differently(base_url, offline, audio_dir):
    """The same answer under the demo's other part (its own adapter) gets other label probabilities."""
    r = post_file(base_url, audio_dir / "b.flac", part="long_turn")
    assert r.status_code == 200, r.text
    want = offline["b.flac"]  # part interview
    diff = max(abs(r.json()["probabilities"][k] - v) for k, v in want["probabilities"].items())
    assert diff > 0.01


def test_clipped_and_noisy_speech_are_sent_to_review(base_url, offline, trust_files):
    """`l2grader score` and POST /v1/score: uncertainty, quality, label mass and review on every answer;
    clipping and low SNR are caught, clean speech has neither."""
    before = settled_metrics(base_url)
    aspect_scores = []
    for name, path in trust_files.items():
        r = post_file(base_url, path)
        assert r.status_code == 200, r.text
        for got in (r.json(), offline[path.name]):
            assert 0 < got["label_mass"] <= 1 and got["uncertainty"]["label_mass"] == got["label_mass"]
            assert set(got["uncertainty"]) == {"score_sd", "entropy", "label_mass", "chunk_spread"}
            assert 0 <= got["uncertainty"]["entropy"] <= 1 and got["uncertainty"]["score_sd"] >= 0
            assert set(got["quality"]) == set(Quality.model_fields)
            assert got["quality"]["speech_detector"] == "silero_vad" and got["interval_status"] == "uncalibrated"
            assert all(0 < c["label_mass"] <= 1 for c in got["chunks"])
            reasons = got["review"]["reasons"]
            assert got["review"]["needed"] == bool(reasons)
            assert ("clipping" in reasons) == (name == "clipped"), (name, got["quality"], reasons)
            assert ("low_snr" in reasons) == (name == "noisy"), (name, got["quality"], reasons)
        assert r.json()["review"] == offline[path.name]["review"]
        assert r.json()["quality"] == offline[path.name]["quality"]
        # the interview's four aspects, from `l2grader score` as over HTTP
        aspects = {name: a["score"] for name, a in r.json()["aspects"].items()}
        assert set(aspects) == {"fluency", "pronunciation", "language_use", "coherence"}
        assert aspects == pytest.approx({k: a["score"] for k, a in offline[path.name]["aspects"].items()}, abs=1e-5)
        aspect_scores.append(aspects)
    after = settled_metrics(base_url)
    for name in aspect_scores[0]:  # one observation per answer and aspect; Ray sums them by bucket midpoints
        count, total = (
            metric(after, f"l2grader_aspect_score_{x}", part="interview", aspect=name)
            - metric(before, f"l2grader_aspect_score_{x}", part="interview", aspect=name)
            for x in ("count", "sum")
        )
        assert count == 3 and total == pytest.approx(sum(a[name] for a in aspect_scores), abs=3 * 0.25), name
    for reason in ("clipping", "low_snr"):
        grown = metric(after, "l2grader_review_reasons_total", part="interview", reason=reason) - metric(
            before, "l2grader_review_reasons_total", part="interview", reason=reason
        )
        assert grown == 1, reason
    verdicts = sum(
        metric(after, "l2grader_review_verdicts_total", part="interview", needed=v)
        - metric(before, "l2grader_review_verdicts_total", part="interview", needed=v)
        for v in ("true", "false")
    )
    assert verdicts == 3
    uncalibrated = metric(after, "l2grader_intervals_total", part="interview", status="uncalibrated") - metric(
        before, "l2grader_intervals_total", part="interview", status="uncalibrated"
    )
    assert uncalibrated == 3  # the demo adapters have no calibration


def fields(x):
    """The field names of a JSON answer, nested (values and list lengths aside)."""
    if isinstance(x, dict):
        return {k: fields(v) for k, v in x.items()}
    if isinstance(x, list):  # a list of objects: its first one's fields (reasons, a list of codes: none)
        return [fields(v) for v in x[:1] if isinstance(v, dict)]
    return None


def test_the_api_docs_examples_have_exactly_the_answers_fields(base_url, audio_dir):
    """docs/api.md's single answer and batch (scripts/api_examples.py writes them) have the service's fields."""
    import re

    page = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    single_doc, batch_doc = (json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", page, re.S)[:2])
    single = post_file(base_url, audio_dir / "a.wav", response_id="r-001")  # 20 s, one chunk
    assert single.status_code == 200, single.text
    assert fields(single.json()) == fields(single_doc)
    assert set(single_doc["aspects"]) == {"fluency", "pronunciation", "language_use", "coherence"}
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    answers = [
        {"part": "long_turn", "response_id": "r-001", "audio_base64": b64(audio_dir / "a.wav")},
        {"part": "interview", "response_id": "r-002", "audio_base64": b64(audio_dir / "silent.wav")},
    ]
    batch = httpx.post(
        f"{base_url}/v1/score/batch", json={"candidate_id": "c-42", "answers": answers}, headers=USER, timeout=120
    )
    assert batch.status_code == 200, batch.text
    got = batch.json()
    assert [fields(r) for r in got["results"]] == [fields(r) for r in batch_doc["results"]]  # scored, not scorable
    assert fields(got) == fields(batch_doc)
    assert batch_doc["results"][0]["aspects"]["coherence"]["adapter"].startswith("long_turn.coherence@")


def test_batch_scores_the_answers_it_can(base_url, audio_dir, trust_files):
    """One silent answer of three: 200, two scored, one not_scorable; the overall withheld (the default rule), for
    review, each part's mean shown."""
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    before = settled_metrics(base_url)
    batch = {
        "candidate_id": "cand-2",
        "answers": [
            {"part": "interview", "audio_base64": b64(trust_files["clean"]), "response_id": "q1"},
            {"part": "long_turn", "audio_base64": b64(audio_dir / "silent.wav"), "response_id": "q2"},
            {"part": "long_turn", "audio_base64": b64(audio_dir / "a.wav"), "response_id": "q3"},
        ],
    }
    r = httpx.post(f"{base_url}/v1/score/batch", json=batch, headers=USER, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["status"] for x in body["results"]] == ["scored", "not_scorable", "scored"]
    silent = body["results"][1]
    assert silent["response_id"] == "q2" and silent["part"] == "long_turn"
    assert silent["reason"]["kind"] == "silence" and "silent" in silent["reason"]["message"]
    overall = body["overall"]
    assert overall["scored"] == 2 and overall["not_scorable"] == 1
    assert overall["failed"] == 0 and overall["complete"] is True
    assert (overall["score"], overall["cefr"], overall["withheld"]) == (None, None, True)  # silence never helps
    assert [(w["kind"], w["part"]) for w in overall["withheld_reasons"]] == [("not_scorable", "long_turn")]
    assert overall["by_part"]["interview"]["score"] == pytest.approx(body["results"][0]["score"])
    assert overall["by_part"]["long_turn"]["score"] == pytest.approx(body["results"][2]["score"])
    assert overall["interval_status"] == "withheld" and "withhold" in overall["rule"]
    assert overall["review"]["needed"] and "not_scorable" in overall["review"]["reasons"]
    after = settled_metrics(base_url)
    grown = metric(after, "l2grader_review_reasons_total", part="long_turn", reason="not_scorable") - metric(
        before, "l2grader_review_reasons_total", part="long_turn", reason="not_scorable"
    )
    assert grown == 1
    # the single-answer endpoint keeps its 422, and a batch of only bad audio still answers
    assert post_file(base_url, audio_dir / "silent.wav").status_code == 422
    only_bad = {"answers": [{"part": "interview", "audio_base64": b64(audio_dir / "corrupt.wav")}]}
    r = httpx.post(f"{base_url}/v1/score/batch", json=only_bad, headers=USER, timeout=120)
    assert r.status_code == 200, r.text
    got = r.json()["overall"]
    assert {k: got[k] for k in ("score", "cefr", "withheld", "interval", "scored", "not_scorable", "failed")} == {
        "score": None,
        "cefr": None,
        "withheld": True,
        "interval": None,
        "scored": 0,
        "not_scorable": 1,
        "failed": 0,
    }
    assert got["complete"] is True  # the candidate's audio, not a failure of the grader
    assert got["review"] == {"needed": True, "reasons": ["not_scorable"]} and got["aspects"] == {}
    assert [(w["kind"], w["part"]) for w in got["withheld_reasons"]] == [("not_scorable", "interview")]
    assert r.json()["results"][0]["reason"]["kind"] == "undecodable"


def test_json_base64_and_batch(base_url, audio_dir):
    audio = base64.b64encode((audio_dir / "a.wav").read_bytes()).decode()
    r = httpx.post(f"{base_url}/v1/score", json={"part": "long_turn", "audio_base64": audio}, headers=USER, timeout=120)
    assert r.status_code == 200, r.text
    single = r.json()
    assert single["part"] == "long_turn" and single["response_id"] is None
    batch = {
        "candidate_id": "cand-1",
        "answers": [
            {"part": "interview", "audio_base64": audio, "response_id": "q1"},
            {"part": "long_turn", "audio_base64": audio, "response_id": "q2"},
        ],
    }
    r = httpx.post(f"{base_url}/v1/score/batch", json=batch, headers=USER, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["response_id"] for x in body["results"]] == ["q1", "q2"]
    assert body["results"][1]["score"] == pytest.approx(single["score"], abs=1e-5)
    assert body["overall"]["score"] == pytest.approx(np.mean([x["score"] for x in body["results"]]))  # equal weights
    assert body["overall"]["cefr"] in {"A1", "A2", "B1", "B2", "C1", "C2"} and not body["overall"]["withheld"]
    assert {p: v["weight"] for p, v in body["overall"]["by_part"].items()} == {"interview": 0.5, "long_turn": 0.5}
    assert body["overall"]["interval_status"] == "uncalibrated"  # the demo adapters have no calibration


def test_64_concurrent_requests_across_two_parts(base_url, tmp_path):
    files = [write(tmp_path / f"c{i}.wav", 8 + i % 5, 16000, seed=100 + i) for i in range(8)]
    jobs = [(files[i % 8], ("interview", "long_turn")[i % 2]) for i in range(64)]
    with ThreadPoolExecutor(max_workers=64) as pool:
        responses = list(pool.map(lambda job: post_file(base_url, job[0], part=job[1]), jobs))
    assert [r.status_code for r in responses] == [200] * 64
    assert {r.json()["part"] for r in responses} == {"interview", "long_turn"}


def test_register_score_and_delete_a_part(base_url, tiny_dir, adapter_root, audio_dir, service_cfg):
    from transformers import Qwen2AudioForConditionalGeneration

    from adapters.tiny_model import make_demo_adapter

    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_dir / "model")
    adapter = make_demo_adapter(model, adapter_root / "opinion_v1", "opinion", seed=777)
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

    bad = httpx.put(f"{base_url}/v1/parts/broken", json={"adapter": str(adapter_root / "nowhere")}, headers=ADMIN)
    assert bad.status_code == 422 and "does not exist" in bad.json()["error"]["message"]

    assert httpx.delete(f"{base_url}/v1/parts/opinion", headers=ADMIN).status_code == 200
    gone = post_file(base_url, audio_dir / "a.wav", part="opinion")
    assert gone.status_code == 404 and gone.json()["error"]["kind"] == "unknown_part"
    assert httpx.delete(f"{base_url}/v1/parts/opinion", headers=ADMIN).status_code == 404


def test_bad_inputs_get_their_status_and_are_counted(base_url, audio_dir, tmp_path):
    before = settled_metrics(base_url)
    blip = np.zeros(16000 * 4, dtype=np.float32)
    blip[:4000] = speechlike(0.25)
    sf.write(tmp_path / "blip.wav", blip, 16000)
    huge = tmp_path / "huge.wav"
    huge.write_bytes(b"\0" * (25 * 1024 * 1024))
    long = write(tmp_path / "long.flac", 700, 8000, seed=5)
    cases = [
        (post_file(base_url, audio_dir / "a.wav", part="no_such_part"), 404, "unknown_part"),
        (
            httpx.post(f"{base_url}/v1/score", data={"part": "interview"}, files={"x": ("a", b"1")}, headers=USER),
            422,
            "invalid_request",
        ),
        (httpx.post(f"{base_url}/v1/score", json={"audio_base64": "AAAA"}, headers=USER), 422, "invalid_request"),
        (post_file(base_url, audio_dir / "corrupt.wav"), 422, "undecodable"),
        (post_file(base_url, audio_dir / "empty.wav"), 422, "empty"),
        (post_file(base_url, audio_dir / "silent.wav"), 422, "silence"),
        (post_file(base_url, tmp_path / "blip.wav"), 422, "silence"),
        (post_file(base_url, huge), 413, "too_large"),
        (post_file(base_url, long), 413, "too_long"),
        (
            httpx.post(f"{base_url}/v1/score", content=b"hello", headers={**USER, "content-type": "text/plain"}),
            415,
            "unsupported_media_type",
        ),
    ]
    for response, status, kind in cases:
        assert response.status_code == status, (kind, response.text)
        err = response.json()
        assert err["error"]["kind"] == kind and err["error"]["message"] and err["request_id"]
    assert "too short to score" in cases[6][0].json()["error"]["message"]

    assert post_file(base_url, audio_dir / "c.ogg").status_code == 200  # the replica is still alive
    after = settled_metrics(base_url)
    for kind, n in [
        ("unknown_part", 1),
        ("invalid_request", 2),
        ("undecodable", 1),
        ("empty", 1),
        ("silence", 2),
        ("too_large", 1),
        ("too_long", 1),
        ("unsupported_media_type", 1),
    ]:
        assert (
            metric(after, "l2grader_errors_total", kind=kind) - metric(before, "l2grader_errors_total", kind=kind) == n
        ), kind
    assert metric(after, "l2grader_audio_seconds_scored_total", part="interview") > 0
    assert metric(after, "l2grader_scorer_adapter_loads_total", part="interview") >= 1
    assert "ray_l2grader_request_latency_seconds_bucket" in after  # gauges: the dashboard test, which polls
    assert metric(after, "l2grader_scorer_answers_total", part="interview") >= 1


def test_api_keys(base_url, audio_dir):
    assert post_file(base_url, audio_dir / "a.wav", headers={}).status_code == 401
    assert post_file(base_url, audio_dir / "a.wav", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{base_url}/v1/parts").status_code == 401
    assert httpx.delete(f"{base_url}/v1/parts/interview", headers=USER).status_code == 403
    assert post_file(base_url, audio_dir / "a.wav", headers=ADMIN).status_code == 200


def test_recorded_formats_score_like_the_wav(base_url, offline, recorded_files):
    # The tiny model has random weights, so how far codec loss moves its score says little; 0.15 holds for
    # this answer (other answers: up to 0.34 for AAC).
    scores = {}
    for fmt, path in recorded_files.items():
        r = post_file(base_url, path)
        assert r.status_code == 200, (fmt, r.text)
        scores[fmt] = r.json()["score"]
    for fmt, score in scores.items():
        assert offline[recorded_files[fmt].name]["score"] == pytest.approx(score, abs=1e-5)  # the same decoding
        assert score == pytest.approx(scores["wav"], abs=0.15), (fmt, scores)  # codec loss only


def test_malformed_authorization_headers_are_401(base_url, audio_dir):
    for value in ("Bearer cl\u00e9-\u00fc", "Bearer", "Basic abc", "bearer" + "x" * 5000):
        r = httpx.get(f"{base_url}/v1/parts", headers={"Authorization": value.encode("utf-8")})
        assert r.status_code == 401, (value[:20], r.text)
        assert r.json()["error"]["kind"] == "unauthorized"


# ---------------------------------------------------------------- failing closed, slow clients, replica death


def test_callers_without_an_admin_key_see_no_paths(base_url, tiny_dir):
    for path in ("/readyz", "/metrics", "/v1/parts"):
        text = httpx.get(f"{base_url}{path}", headers=USER).text
        assert str(tiny_dir) not in text and "/adapters/" not in text, path
    assert str(tiny_dir) in httpx.get(f"{base_url}/v1/parts", headers=ADMIN).text
    assert str(tiny_dir) in httpx.get(f"{base_url}/readyz", headers=ADMIN).text
    parts = {p["part"]: p for p in httpx.get(f"{base_url}/v1/parts", headers=USER).json()["parts"]}
    assert parts["interview"]["aspects"] == ["coherence", "fluency", "language_use", "pronunciation"]  # by id
    assert parts["long_turn"]["aspects"] == ["coherence"]  # scored by an adapter of its own, whose path stays hidden


def test_admin_calls_without_an_admin_key_are_refused(base_url, tiny_dir):
    body = {"adapter": str(tiny_dir / "adapters" / "interview")}
    assert httpx.put(f"{base_url}/v1/parts/x", json=body).status_code == 401
    assert httpx.put(f"{base_url}/v1/parts/x", json=body, headers=USER).status_code == 403
    assert httpx.delete(f"{base_url}/v1/parts/interview").status_code == 401


async def _hold_slow_upload(port: int, results: list, stop_s: float, sending: list | None = None) -> None:
    """Send a score request's headers, then its body one byte a second: a client on a very bad line. Once its
    headers are sent it joins ``sending``."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/score HTTP/1.1\r\nHost: t\r\nAuthorization: "
        + USER["Authorization"].encode()
        + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
    )
    await writer.drain()
    if sending is not None:
        sending.append(writer)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + stop_s
    try:
        while loop.time() < deadline:
            try:
                status = await asyncio.wait_for(reader.readline(), 1.0)
                try:  # the head, then the body by its Content-Length
                    rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    length = re.search(rb"content-length: *(\d+)", rest, re.I)
                    rest += await asyncio.wait_for(reader.readexactly(int(length[1])), 5) if length else b""
                except (ConnectionResetError, asyncio.IncompleteReadError):  # closed with our unread bytes: reset
                    rest = b""
                results.append((status.decode().split(" ")[1] if status else "closed", rest))
                return
            except asyncio.TimeoutError:
                writer.write(b"x")
                await writer.drain()
        results.append(("held", b""))
    finally:
        writer.close()


def test_150_slow_uploads_do_not_starve_health_or_scoring(base_url, audio_dir):
    import asyncio
    import time

    port = int(base_url.rsplit(":", 1)[1])

    async def run():
        results: list = []
        sending: list = []
        slow = [
            asyncio.create_task(_hold_slow_upload(port, results, SERVICE_BODY_TIMEOUT_S + 20, sending))
            for _ in range(150)
        ]
        await until(lambda: len(sending) == 150, "150 slow uploads sending", timeout_s=60)
        async with httpx.AsyncClient(timeout=30) as client:
            t0 = time.perf_counter()
            health = await client.get(f"{base_url}/healthz")
            health_s = time.perf_counter() - t0
            with open(audio_dir / "c.ogg", "rb") as f:  # an 8 s answer
                t0 = time.perf_counter()
                scored = await client.post(
                    f"{base_url}/v1/score", data={"part": "interview"}, files={"audio": ("c.ogg", f)}, headers=USER
                )
            score_s = time.perf_counter() - t0
        await asyncio.gather(*slow)
        return health, health_s, scored, score_s, results

    health, health_s, scored, score_s, results = asyncio.run(run())
    assert health.status_code == 200 and health_s < 1.0, health_s
    assert scored.status_code == 200 and score_s < 2.0, (scored.text[:300], score_s)
    statuses = [s for s, _ in results]
    assert statuses == ["408"] * 150, statuses  # each slow upload was cut off at the deadline, with a JSON body
    read = [body for _, body in results if body]
    assert read and all(b'"body_timeout"' in body and b"connection: close" in body.lower() for body in read)


def test_refused_admin_calls_with_invented_ids_do_not_grow_the_metrics(base_url):
    import asyncio
    import random
    import string

    rng = random.Random(15)
    ids = ["".join(rng.choices(string.ascii_letters, k=2000)) for _ in range(3000)]

    async def run():
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=60) as client:

            async def refused(i: int, part: str):
                async with limit:
                    if i % 2:
                        return (await client.put(f"{base_url}/v1/parts/{part}", json={})).status_code
                    return (await client.delete(f"{base_url}/v1/parts/{part}")).status_code

            return await asyncio.gather(*(refused(i, p) for i, p in enumerate(ids)))

    before = settled_metrics(base_url)
    assert set(asyncio.run(run())) == {401}
    text = settled_metrics(base_url)
    # a handful of new series (refused PUT and DELETE by status), none per invented id
    assert len(text.encode()) - len(before.encode()) < 50_000 and ids[0][:64] not in text
    # A keyless PUT is refused by the proxy before its body is read (the ingress never sees it); DELETEs reach it.
    assert metric(text, "l2grader_requests_total", endpoint="delete_part", part="-", status="401") >= 1500


def _lora_with_wrong_input_size(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose LoRA A matrices take 96 inputs where the model has 128 (rank and files intact)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(src / "adapter_model.safetensors"))
    save_file(
        {k: (v[:, :96].copy() if ".lora_A." in k else v) for k, v in weights.items()},
        str(dst / "adapter_model.safetensors"),
    )
    return dst


def test_adapters_that_cannot_score_are_refused_before_registration(base_url, tiny_dir, adapter_root, audio_dir):
    source = tiny_dir / "adapters" / "interview"
    wrong_rank = adapter_root / "wrong_rank"
    import shutil

    shutil.copytree(source, wrong_rank)
    config = json.loads((wrong_rank / "adapter_config.json").read_text())
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    levels = [{"label": f"L{i}", "cefr": "A1", "score": i, "descriptor": "d"} for i in range(25)]
    cases = {
        "rank": ({"adapter": str(wrong_rank)}, "does not match rank 8"),
        "dims": (
            {"adapter": str(_lora_with_wrong_input_size(source, adapter_root / "wrong_dims"))},
            "base model needs",
        ),
        "levels": ({"adapter": str(source), "levels": levels}, "at most 20"),
        "outside": ({"adapter": "/etc"}, "outside"),
        "missing": ({"adapter": "/no/such/adapter"}, "outside"),
        "prompt": ({"adapter": str(source), "task": "describe " * 3000}, "max_model_len"),
    }
    for name, (body, message) in cases.items():
        r = httpx.put(f"{base_url}/v1/parts/bad-{name}", json=body, headers=ADMIN, timeout=120)
        assert r.status_code == 422 and message in r.text, (name, r.text[:500])
    parts = {p["part"] for p in httpx.get(f"{base_url}/v1/parts", headers=USER).json()["parts"]}
    assert not any(p.startswith("bad-") for p in parts)
    assert post_file(base_url, audio_dir / "c.ogg").status_code == 200


def _node_export_and_logs(service_log: Path) -> tuple[str, Path]:
    """This service's Ray node metrics export URL and its replicas' log folder (``logs/serve`` of the Ray session),
    as ``l2grader serve`` announced them."""
    import re

    text = service_log.read_text()
    logs, export = re.search(r"l2grader: logs: (\S+) ", text), re.search(r"metrics export of this node: (\S+)", text)
    assert logs and export, "l2grader serve did not announce its logs and metrics export"
    return export[1], Path(logs[1]) / "serve"


def test_serve_prints_only_its_own_lines(base_url, service_log):
    """Quiet by default: Ray's, Ray Serve's and vLLM's lines stay in the log folder (errors Ray reports aside)."""
    lines = service_log.read_text().splitlines()
    assert any(line.startswith("l2grader: listening on ") for line in lines)
    assert [line for line in lines if not line.startswith("l2grader: ") and "(raylet)" not in line] == []


def _total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_dashboard_metrics_and_json_request_logs(base_url, service_log, audio_dir, tiny_dir):
    """After scoring, the node's Ray metrics export holds every series and label the Grafana dashboard queries,
    the engine's among them; the ingress logs each API request as one JSON line
    with its request id, part, status and latency, and every replica log line is JSON."""
    from tests.dashboard_check import exported_series, load_dashboard, problems

    export_url, serve_logs = _node_export_and_logs(service_log)
    before = httpx.get(export_url, timeout=30).text
    # Every event a dashboard panel shows: answers of three parts with two adapter slots (loads and an eviction),
    # an error, a batch with an answer that cannot be scored (review reasons).
    body = {"adapter": str(tiny_dir / "adapters" / "interview"), "task": "Part 6: the candidate describes a photo."}
    assert httpx.put(f"{base_url}/v1/parts/photo", json=body, headers=ADMIN, timeout=120).status_code == 200
    scored = [post_file(base_url, audio_dir / "c.ogg", part=part) for part in ("photo", "interview", "long_turn")]
    assert [r.status_code for r in scored] == [200] * 3, [r.text[:200] for r in scored]
    assert post_file(base_url, audio_dir / "silent.wav").status_code == 422
    b64 = base64.b64encode((audio_dir / "silent.wav").read_bytes()).decode()
    batch = httpx.post(
        f"{base_url}/v1/score/batch",
        headers=USER,
        timeout=120,
        json={"candidate_id": "c", "answers": [{"part": "interview", "audio_base64": b64}]},
    )
    assert batch.status_code == 200 and batch.json()["overall"]["not_scorable"] == 1
    assert httpx.delete(f"{base_url}/v1/parts/photo", headers=ADMIN).status_code == 200
    chunks = sum(len(r.json()["chunks"]) for r in scored)

    dashboard = load_dashboard()
    deadline = time.monotonic() + 60  # replicas hand their metrics to the node's agent every 2 s
    seen: dict[str, set[str]] = {}  # what the scrapes of the window held (Ray drops gauges set less often than 4 s)
    while True:
        after = httpx.get(export_url, timeout=30).text
        for name, labels in exported_series(after).items():
            seen[name] = seen.get(name, set()) | labels
        missing = problems(dashboard, seen)
        finished = _total(after, "ray_l2grader_engine_requests_finished_total") - _total(
            before, "ray_l2grader_engine_requests_finished_total"
        )
        if (not missing and finished >= chunks) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, missing
    # The engine's own numbers (vLLM's statistics, exported by the scorer replica): every chunk scored is counted.
    assert chunks >= 3 and finished >= chunks, (finished, chunks)
    for name in ("ray_l2grader_engine_prompt_tokens_total", "ray_l2grader_engine_time_to_first_token_seconds_count"):
        assert _total(after, name) > _total(before, name), name
    for gauge in ("requests_running", "requests_waiting", "kv_cache_usage", "lora_adapters_running"):
        assert f"ray_l2grader_engine_{gauge}" in seen, gauge

    rid = scored[1].json()["request_id"]
    ingress_logs = sorted(serve_logs.glob("replica_l2grader_Ingress_*.log"))
    assert ingress_logs, f"no ingress replica log in {serve_logs}"
    ingress_lines = [json.loads(line) for f in ingress_logs for line in f.read_text().splitlines()]  # all JSON
    mine = [r for r in ingress_lines if r.get("request_id") == rid and "latency_ms" in r]
    assert len(mine) == 1, mine
    assert mine[0]["part"] == "interview" and mine[0]["status"] == 200 and mine[0]["endpoint"] == "score"
    assert 0 < mine[0]["latency_ms"] < 300_000 and mine[0]["deployment"].endswith("Ingress")
    refused = [r for r in ingress_lines if r.get("status") == 422 and r.get("part") == "interview"]
    assert refused, "refused requests are logged too"
    scorer_lines = [
        json.loads(line)
        for f in sorted(serve_logs.glob("replica_l2grader_Scorer_*.log"))
        for line in f.read_text().splitlines()
    ]
    assert scorer_lines and all(r["deployment"].endswith("Scorer") for r in scorer_lines)


def wait_until(condition, what: str, timeout_s: float) -> None:
    """Return once ``condition()`` holds (polled); fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} in {timeout_s:g} s"
        time.sleep(0.05)


def test_a_killed_engine_process_gives_503s_and_its_replica_is_replaced(real_service, audio_dir):
    """Last in this module: vLLM's engine process of the scorer replica is killed under a few answers in flight.

    Answers get 200 or a retryable 503 (never 500), /readyz says in words that no scorer can score, Serve's
    health check replaces the replica, and a new answer is scored by the replacement within the bound below
    (health check ~6 s plus the replica's start: the engine's load and warm-up on the tiny checkpoint)."""
    import os
    import signal
    import threading

    import psutil

    bound_s = 240
    answer = (audio_dir / "c.ogg").read_bytes()
    results: list[tuple[float, int, str]] = []  # (sent at, status, response id) of each answer
    readiness: list[tuple[int, str]] = []  # /readyz while it was not 200
    bad: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            sent = time.monotonic()
            r = httpx.post(
                f"{real_service.url}/v1/score",
                data={"part": "interview", "response_id": f"e{i}-{n}"},
                files={"audio": ("c.ogg", answer)},
                headers=USER,
                timeout=300,
            )
            results.append((sent, r.status_code, f"e{i}-{n}"))
            if r.status_code != 200 and not (
                r.status_code == 503 and r.headers.get("retry-after") and r.json()["error"]["kind"] == "unavailable"
            ):
                bad.append(f"{r.status_code} {r.headers.get('retry-after')} {r.text[:200]}")
            if r.status_code == 503:
                time.sleep(0.5)

    def watch_readiness() -> None:
        while not stop.is_set():
            r = httpx.get(f"{real_service.url}/readyz", timeout=30)
            if r.status_code != 200:
                readiness.append((r.status_code, r.json().get("reason", "")))
            time.sleep(0.5)

    def engine_cores() -> list[psutil.Process]:
        found = []
        for p in psutil.Process(real_service.pid).children(recursive=True):
            try:
                if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found

    (core,) = engine_cores()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=watch_readiness))
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        os.kill(core.pid, signal.SIGKILL)
        killed = time.monotonic()
        while not any(sent > killed + 1 and status == 200 for sent, status, _ in results):
            assert time.monotonic() - killed < bound_s, f"no answer scored within {bound_s} s of the kill"
            assert not bad, bad[:3]
            time.sleep(0.5)
        recovered_s = min(sent for sent, status, _ in results if sent > killed + 1 and status == 200) - killed
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    statuses = {status for _, status, _ in results}
    counts = {code: sum(status == code for _, status, _ in results) for code in sorted(statuses)}
    print(f"engine process killed: answers sent {recovered_s:.1f} s after the kill were scored again; {counts}")
    assert not bad and statuses <= {200, 503} and 503 in statuses, (statuses, bad[:3])
    assert readiness and all(status == 503 and reason for status, reason in readiness), readiness
    reasons = {reason for _, reason in readiness}
    assert any("engine stopped" in reason for reason in reasons), reasons
    assert all("Error" not in reason for reason in reasons), reasons
    (new_core,) = engine_cores()
    assert new_core.pid != core.pid
    refused = next(rid for _, status, rid in results if status == 503)
    assert post_file(real_service.url, audio_dir / "c.ogg", response_id=refused).json()["response_id"] == refused
