"""Every door gives the same answer: the same files over HTTP (one answer and a batch), in a bulk session and
in ``evaluate`` of that session, against the one real service (real Ray Serve, vLLM, HTTP).

Clean, noisy and silent answers over two parts, one of them added with ``PUT /v1/parts``: the session's rows
equal the HTTP answers field by field (scores and probabilities within 1e-5, the same label mass, uncertainty,
quality, review, model, and the same for each analytic aspect, one of them scored by an adapter of its own), its
candidates file equals the batch endpoint's ``overall`` (with each aspect's mean), and ``evaluate --session``
reports on the bulk output without scoring again.
"""

from __future__ import annotations

import base64
import csv
import json

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from serve.session.schema import answer_of_row
from tests.audio_fixtures import not_speech, speechlike
from tests.conftest import ADMIN, USER, l2grader, what_it_said

pytestmark = pytest.mark.engine

ADDED = "doors_added"
#: The aspects each part's answers carry: the demo interview's four built-ins, and the part added here.
WANT_ASPECTS = {"interview": {"fluency", "pronunciation", "language_use", "coherence"}, ADDED: {"fluency", "coherence"}}


def write_answers(d) -> list[dict]:
    """Manifest rows: per candidate a clean and a noisy answer of each part, one silent answer and one of music
    (sound at speech loudness with no speech in it: not scorable as ``noise``, not ``silence``)."""
    rows = []
    for c in range(2):
        for k, part in enumerate(("interview", ADDED)):
            clean = speechlike(6 + 2 * k + c, seed=10 * c + k)
            noisy = np.clip(
                3 * speechlike(7, seed=50 + 10 * c + k) + np.random.default_rng(c).normal(0, 0.3, 7 * 16000), -1, 1
            )
            for kind, wave in (("clean", clean), ("noisy", noisy)):
                name = f"c{c}-{part}-{kind}.wav"
                sf.write(d / name, wave.astype(np.float32), 16000)
                rows.append({"response_id": name[:-4], "candidate_id": f"cand-{c}", "part": part, "audio": name})
        sf.write(d / f"c{c}-silent.wav", np.zeros(3 * 16000, np.float32), 16000)
        rows.append(
            {
                "response_id": f"c{c}-silent",
                "candidate_id": f"cand-{c}",
                "part": "interview",
                "audio": f"c{c}-silent.wav",
            }
        )
        sf.write(d / f"c{c}-music.wav", not_speech("music-like", 4.0, seed=c).astype(np.float32), 16000)
        rows.append(
            {"response_id": f"c{c}-music", "candidate_id": f"cand-{c}", "part": ADDED, "audio": f"c{c}-music.wav"}
        )
    return rows


@pytest.fixture
def removes_added_part(real_service):
    """The part this test adds leaves the shared service after it (other modules see the demo's parts only)."""
    yield
    httpx.delete(f"{real_service.url}/v1/parts/{ADDED}", headers=ADMIN, timeout=60)


def test_bulk_rows_and_candidates_equal_the_http_answers_and_evaluate_reads_them(
    real_service, removes_added_part, tiny_dir, tmp_path
):
    url = real_service.url
    put = httpx.put(
        f"{url}/v1/parts/{ADDED}",
        json={
            "adapter": str(tiny_dir / "adapters" / "long_turn"),
            "task": "Describe a place you know well.",
            # one aspect scored by the part's adapter, one by an adapter of its own
            "aspects": {"fluency": {}, "coherence": {"adapter": str(tiny_dir / "adapters" / "long_turn.coherence")}},
        },
        headers=ADMIN,
        timeout=300,
    )
    assert put.status_code == 200, put.text
    rows = write_answers(tmp_path)

    # Over HTTP: each answer alone, then each candidate's answers as one batch.
    single, batches = {}, {}
    for r in rows:
        with open(tmp_path / r["audio"], "rb") as f:
            resp = httpx.post(
                f"{url}/v1/score",
                data={"part": r["part"], "response_id": r["response_id"]},
                files={"audio": (r["audio"], f)},
                headers=USER,
                timeout=300,
            )
        single[r["response_id"]] = resp
    for cid in ("cand-0", "cand-1"):
        answers = [
            {
                "part": r["part"],
                "response_id": r["response_id"],
                "audio_base64": base64.b64encode((tmp_path / r["audio"]).read_bytes()).decode(),
            }
            for r in rows
            if r["candidate_id"] == cid
        ]
        resp = httpx.post(
            f"{url}/v1/score/batch", json={"candidate_id": cid, "answers": answers}, headers=USER, timeout=600
        )
        assert resp.status_code == 200, resp.text
        batches[cid] = resp.json()
    silent = single.pop("c0-silent"), single.pop("c1-silent")
    assert all(s.status_code == 422 and s.json()["error"]["kind"] == "silence" for s in silent)
    music = single.pop("c0-music"), single.pop("c1-music")
    assert all(s.status_code == 422 and s.json()["error"]["kind"] == "noise" for s in music)
    assert all("noise or music" in s.json()["error"]["message"] for s in music)
    in_batches = {a["response_id"]: a for b in batches.values() for a in b["results"]}
    assert {in_batches[f"c{c}-music"]["status"] for c in range(2)} == {"not_scorable"}
    assert all(s.status_code == 200 for s in single.values()), {
        k: s.text for k, s in single.items() if s.status_code != 200
    }
    noisy = [s.json() for k, s in single.items() if k.endswith("noisy")]
    assert all(a["review"]["needed"] and "low_snr" in a["review"]["reasons"] for a in noisy)

    # In bulk, with the service's own config (its registry holds the part added with PUT).
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    r = l2grader(
        "score-session",
        "--config",
        real_service.config,
        "--manifest",
        tmp_path / "manifest.csv",
        "--out",
        out,
        timeout=900,
    )
    assert r.returncode == 0, what_it_said(r)
    bulk = {row["response_id"]: row for row in pq.read_table(out / "answers").to_pylist()}
    assert {bulk[f"c{c}-silent"]["error_kind"] for c in range(2)} == {"silence"}
    assert {bulk[f"c{c}-music"]["error_kind"] for c in range(2)} == {"noise"}

    for rid, resp in single.items():
        http = resp.json()
        row = answer_of_row(bulk[rid]).model_dump()
        in_batch = next(a for b in batches.values() for a in b["results"] if a["response_id"] == rid)
        for other in (http, in_batch):
            assert other["model"]["adapter"] == row["model"]["adapter"]
            for field in ("score", "probabilities", "uncertainty"):
                assert row[field] == pytest.approx(other[field], abs=1e-5), (rid, field)
            assert row["label_mass"] == pytest.approx(other["label_mass"], abs=1e-5)
            assert row["quality"] == other["quality"] and row["review"] == other["review"], rid
            same = ("status", "part", "cefr", "hard_score", "label_cefr", "duration_s", "model")
            assert {k: row[k] for k in same} == {k: other[k] for k in same}, rid
            assert set(row["aspects"]) == set(other["aspects"]) == WANT_ASPECTS[row["part"]], rid
            for name, a in row["aspects"].items():
                b = other["aspects"][name]
                for field in ("score", "probabilities", "uncertainty", "label_mass"):
                    assert a[field] == pytest.approx(b[field], abs=1e-5), (rid, name, field)
                assert {k: a[k] for k in ("cefr", "hard_score", "label_cefr", "adapter")} == {
                    k: b[k] for k in ("cefr", "hard_score", "label_cefr", "adapter")
                }, (rid, name)
            assert set(row) | {"response_id", "request_id", "latency_ms"} == set(other)
    added = answer_of_row(bulk["c0-doors_added-clean"])
    assert added.model.adapter.startswith(f"{ADDED}@")
    assert added.aspects["fluency"].adapter == added.model.adapter  # scored by the part's adapter
    assert added.aspects["coherence"].adapter.startswith(f"{ADDED}.coherence@")  # by its own
    assert added.aspects["coherence"].probabilities != added.aspects["fluency"].probabilities
    assert not added.aspects["fluency"].validated and added.aspects["fluency"].interval_status == "uncalibrated"

    candidates = {c["candidate_id"]: c for c in pq.read_table(out / "candidates.parquet").to_pylist()}
    for cid, b in batches.items():
        c, o = candidates[cid], b["overall"]
        assert c["score"] == pytest.approx(o["score"], abs=1e-5)
        assert set(o["aspects"]) == WANT_ASPECTS["interview"] | WANT_ASPECTS[ADDED]
        assert dict(c["aspects"]) == pytest.approx(o["aspects"], abs=1e-5)
        assert {k: c[k] for k in ("cefr", "scored", "not_scorable", "review")} == {
            k: o[k] for k in ("cefr", "scored", "not_scorable", "review")
        }
        assert c["review"]["needed"] and "not_scorable" in c["review"]["reasons"]
        assert (c["withheld"], c["interval_status"], c["rule"]) == (o["withheld"], o["interval_status"], o["rule"])
        assert c["withheld_reasons"] == o["withheld_reasons"]
        assert {p: v["score"] for p, v in c["by_part"]} == pytest.approx(
            {p: v["score"] for p, v in o["by_part"].items()}
        )

    # evaluate on the bulk output and a file of human scores: no engine, the same report as a test set's.
    with open(tmp_path / "human.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["response_id", "human", "noise"])
        for i, rid in enumerate(sorted(single)):
            w.writerow([rid, 1 + i % 6, "noisy" if rid.endswith("noisy") else "clean"])
    ev = l2grader(
        "evaluate",
        "--config",
        real_service.config,
        "--part",
        "interview",
        "--session",
        out,
        "--human",
        tmp_path / "human.csv",
        "--human-column",
        "human",
        "--group-by",
        "noise",
        "--report",
        tmp_path / "report",
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads(ev.stdout.splitlines()[-1])
    assert summary["answers"] == 4 and summary["not_scorable"] == 2 and summary["untrained"] is True
    part_table = summary["fairness"]["parts"]["interview"]
    assert {g["group"] for g in part_table if g["field"] == "noise"} == {"noisy", "clean"}
    assert all(g["status"] == "inconclusive" for g in part_table)  # 4 answers: too few to judge any group
    assert summary["intervals"]["served_status"] == {"uncalibrated": 4}  # the demo adapters have no calibration
    assert '<p class="untrained"' in (tmp_path / "report" / "report.html").read_text()
    assert "UNTRAINED" in ev.stdout
