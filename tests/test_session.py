"""``l2grader score-session``: a whole session on Ray Data, as a user runs it (real Ray, real engine, real files).

One session of a few hundred short answers of three parts (one of them added
at run time through the part registry, as ``PUT /v1/parts`` adds it) over two
candidates, with corrupt, empty, silent and missing files, an unknown part and
an empty field: the run, with its default options, is stopped with SIGINT to
its process group (as Ctrl-C does) once results arrive, again with SIGTERM to
its process alone (as a stopped pod is), then run to the end; the
output holds every manifest row exactly once, the bad ones with their kind,
and every field of the answer ``l2grader score``'s engine gives on the same
files (scores within 1e-5, the same quality, uncertainty and review); the
candidates file holds what the batch endpoint's ``overall`` holds, the rows the
grader failed to score (not the candidate's audio) apart from those that were
not scorable; a missing file put in place is scored by the next run, and a
finished session run again starts nothing. Manifest and output-folder errors,
a finished session and the exit statuses are checked without Ray or an engine.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from serve.grading.audio import AudioError
from serve.session.sources import manifest_format, read_audio, resolve_audio
from tests.audio_fixtures import write
from tests.conftest import l2grader, what_it_said
from tests.engine_process import engine_process

N_GOOD = 160
BAD = {  # response id -> (part, file, the kind its row must carry)
    "bad-corrupt": ("interview", "corrupt.wav", "undecodable"),
    "bad-empty": ("long_turn", "empty.wav", "empty"),
    "bad-silent": ("interview", "silent.wav", "silence"),
    "bad-missing": ("long_turn", "missing.flac", "unreadable"),
    "bad-part": ("no_such_part", "g0000.wav", "unknown_part"),
    "bad-no-candidate": ("interview", "g0001.wav", "invalid_row"),
}
#: The kinds that are the grader's failures (not the candidate's audio), and the one of them a later run retries.
FAILED_KINDS, RETRYABLE = {"unreadable", "unknown_part", "invalid_row"}, "bad-missing"


# ---------------------------------------------------------------- the session's files


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> dict:
    """Audio files, the manifest rows (relative paths), and the same manifest as CSV and Parquet."""
    d = tmp_path_factory.mktemp("session")
    audio = d / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_GOOD):
        name = f"g{i:04d}.{('wav', 'flac', 'ogg')[i % 3]}"
        write(audio / name, float(rng.uniform(1.5, 3.5)) if i % 40 else 35.0, 16000, seed=i)  # a few of 2 chunks
        rows.append(
            {
                "response_id": f"{i:05d}",
                "candidate_id": f"cand-{i % 2}",
                "part": ("interview", "long_turn", "interview", "opinion")[i % 4],
                "audio": f"audio/{name}",
            }
        )
    (audio / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 8)
    (audio / "empty.wav").write_bytes(b"")
    sf.write(audio / "silent.wav", np.zeros(16000 * 3, dtype=np.float32), 16000)
    for rid, (part, name, _) in BAD.items():
        rows.append(
            {
                "response_id": rid,
                "candidate_id": "" if rid == "bad-no-candidate" else "cand-1",
                "part": part,
                "audio": f"audio/{name}",
            }
        )
    rows.insert(17, rows.pop())  # bad rows among the good ones, not all at the end
    with open(d / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["response_id", "candidate_id", "part", "audio", "note"])
        w.writeheader()
        w.writerows({**r, "note": "extra columns are ignored"} for r in rows)
    pq.write_table(pa.Table.from_pylist(rows), d / "manifest.parquet")
    return {"dir": d, "rows": rows}


@pytest.fixture(scope="module")
def config(tiny_config, tmp_path_factory) -> Path:
    """The demo config with a registry file in which part ``opinion`` was added at run time (as a PUT adds it)."""
    import yaml

    from serve.grading.config import PartConfig
    from serve.service.settings import load_service_config, part_registry

    d = tmp_path_factory.mktemp("session-config")
    raw = tiny_config()
    raw["serving"] = {"registry_file": str(d / "registry.json")}
    (d / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_service_config(d / "c.yaml")
    adapter = raw["parts"]["interview"]["adapter"]
    part_registry(cfg, d / "c.yaml").put("opinion", PartConfig(adapter=adapter, task="Give an opinion."))
    return d / "c.yaml"


def registry_engine(config: Path):
    """``l2grader score``'s engine of a config: an OfflineEngine of the registry's parts."""
    from serve.engine.offline import OfflineEngine
    from serve.service.settings import load_service_config, part_registry

    cfg = load_service_config(config)
    return OfflineEngine(cfg, part_registry(cfg, config).entries())


def scored_files(engine, config: Path, answers: list[tuple[str, Path]]) -> list[dict]:
    """In the engine's process: each (part, file) answer scored, as a dict."""
    from serve.grading.audio import prepare
    from serve.service.settings import load_service_config

    audio = load_service_config(config).audio
    return [r.model_dump() for r in engine.score_answers([(part, prepare(path, audio)) for part, path in answers])]


@pytest.fixture(scope="module")
def reference(session, config) -> dict:
    """What ``l2grader score`` gives for each good answer: its engine (OfflineEngine, in a process of its own)
    and the registry's parts."""
    good = [r for r in session["rows"] if not r["response_id"].startswith("bad-")]
    with engine_process(registry_engine, config) as engine:
        results = engine.call(scored_files, config, [(r["part"], session["dir"] / r["audio"]) for r in good])
    return {r["response_id"]: res for r, res in zip(good, results)}


def score_session(config, manifest, out, *extra, timeout=600, wait=True):
    return l2grader(
        "score-session", "--config", config, "--manifest", manifest, "--out", out, *extra, timeout=timeout, wait=wait
    )


def committed_rows(out: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in (out / "answers").glob("part-*.parquet"))


# ---------------------------------------------------------------- the session, stopped and resumed


def stderr_lines(proc: subprocess.Popen):
    """The process's stderr lines, filled by a thread as they come, and that thread (it ends at their end)."""
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    return lines, reader


def stopped_once_scoring(proc: subprocess.Popen, stop) -> tuple[str, float]:
    """``stop(proc)`` once the run's progress line counts a result; its stderr and the seconds it took to end. It
    ends with 130 and says how to go on."""
    err_lines, reader = stderr_lines(proc)
    deadline = time.time() + 600
    progress = re.compile(r"l2grader: ([1-9]\d*)/\d+ answers \(")  # a resumed run's first batches may be empty
    while not any(progress.match(line) for line in err_lines):
        assert proc.poll() is None, "".join(err_lines)[-3000:]
        assert time.time() < deadline, "no result in time"
        time.sleep(0.2)
    stop(proc)
    asked = time.monotonic()
    proc.wait(timeout=120)
    stopped_s = time.monotonic() - asked
    reader.join(timeout=10)  # the reader thread has taken the last lines once stderr ends
    err = "".join(err_lines)
    assert proc.returncode == 130, err[-3000:]
    assert "run the same command again to go on" in err
    return err, stopped_s


@pytest.mark.engine
def test_stopped_session_resumes_to_every_row_once_with_the_answers_of_score(session, reference, config, tmp_path):
    from serve.grading.answers import candidate_result
    from serve.service.settings import load_service_config, part_registry
    from serve.session.schema import answer_of_row, result_of_row

    manifest, out = session["dir"] / "manifest.parquet", tmp_path / "out"
    total = len(session["rows"])

    # 1. Default options, stopped by SIGINT to its process group (Ctrl-C) once results arrive: it stops within
    # seconds, commits what arrived and exits 130.
    proc = score_session(config, manifest, out, wait=False)
    err, stopped_s = stopped_once_scoring(proc, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert stopped_s < 60, f"took {stopped_s:.0f} s to stop"
    assert "decoding in the engine actors" in err
    first = committed_rows(out)
    assert 1 <= first < total, "the run was not stopped part-way"
    assert not [p for p in (out / "answers").iterdir() if not p.name.startswith("part-")]  # only whole parts

    # 2. Again, stopped by SIGTERM to its process alone (a stopped pod; Ray's own handler must not take it) once
    # more results arrive: the same clean stop. Batches of 16, so that what is left is not one or two batches.
    proc = score_session(config, manifest, out, "--batch-size", 16, wait=False)
    err, stopped_s = stopped_once_scoring(proc, lambda p: p.send_signal(signal.SIGTERM))
    assert stopped_s < 60, f"took {stopped_s:.0f} s to stop"
    second = committed_rows(out)
    assert first < second < total, "the second run was not stopped part-way"

    # 3. Again: only what is missing is scored (decoding in CPU tasks of their own this time, as on a cluster). The
    # rows the grader failed to score (a missing file, an unknown part, an empty field) make it exit 1.
    r = score_session(config, manifest, out, "--batch-size", 16, "--rows-per-part", 16, "--decode", "tasks")
    assert r.returncode == 1, what_it_said(r)
    assert "error: the grader failed to score 3 answer(s)" in r.stderr and "retry the 1 retryable" in r.stderr
    assert "unknown part 'no_such_part'" in r.stderr  # said up front
    assert "decoding in CPU tasks" in r.stderr
    assert [line for line in r.stderr.splitlines() if not line.startswith("l2grader: ")] == []  # quiet by default
    s = json.loads(r.stdout.splitlines()[-1])
    assert s["this_run"]["skipped"] == second and s["this_run"]["answers"] == total - second
    assert (s["answers"], s["manifest_rows"], s["duplicates"]) == (total, total, 0)
    assert s["not_scorable"] == {kind: 1 for _, _, kind in BAD.values() if kind not in FAILED_KINDS}
    assert s["failed"] == {kind: 1 for kind in FAILED_KINDS} and s["retryable"] == 1
    assert s["scored"] == N_GOOD and s["candidates"] == 3  # cand-0, cand-1 and the empty id
    run = s["this_run"]  # throughput over the scoring itself: within the run, over every answer of it
    assert 0 < run["steady_s"] <= s["wall_s"]
    assert run["steady_answers_per_s"] == pytest.approx(run["answers"] / run["steady_s"], rel=0.01)
    assert s["this_run"]["answers_per_s"] > 0 and s["this_run"]["audio_s_per_s"] > 0 and s["wall_s"] > 0

    answers = pq.read_table(out / "answers").to_pylist()
    ids = [a["response_id"] for a in answers]
    assert len(ids) == len(set(ids)) == total and set(ids) == {row["response_id"] for row in session["rows"]}
    by_id = {a["response_id"]: a for a in answers}
    for rid, (part, _name, kind) in BAD.items():
        a = by_id[rid]
        status = "failed" if kind in FAILED_KINDS else "not_scorable"
        assert (a["status"], a["error_kind"], a["part"]) == (status, kind, part), a
        assert a["retryable"] == (rid == RETRYABLE if status == "failed" else None), a
        assert a["error_message"] and a["score"] is None
    assert "no such file" in by_id["bad-missing"]["error_message"]
    diffs = []
    for rid, want in reference.items():
        got = by_id[rid]
        assert got["status"] == "scored" and got["error_kind"] is None
        answer = answer_of_row(got).model_dump()  # every field of the answer, nested ones too
        assert set(answer) == set(want)
        for field in ("score", "probabilities", "uncertainty", "label_mass"):
            assert answer[field] == pytest.approx(want[field], abs=1e-5), (rid, field)
        for mine, theirs in zip(answer["chunks"], want["chunks"], strict=True):
            assert mine == pytest.approx(theirs, abs=1e-5)
        assert answer["aspects"].keys() == want["aspects"].keys(), rid
        for name, mine in answer["aspects"].items():  # each aspect's figures as closely, its labels and adapter equal
            theirs = want["aspects"][name]
            for field in ("score", "probabilities", "uncertainty", "label_mass"):
                assert mine[field] == pytest.approx(theirs[field], abs=1e-5), (rid, name, field)
            assert (mine["cefr"], mine["label_cefr"], mine["adapter"]) == (
                theirs["cefr"],
                theirs["label_cefr"],
                theirs["adapter"],
            ), (rid, name)
        close = ("score", "probabilities", "chunks", "uncertainty", "label_mass", "aspects")
        rest = {k: v for k, v in answer.items() if k not in close}
        assert rest == {k: want[k] for k in rest}, rid  # cefr, labels, label mass, quality, review, model, ...
        diffs.append(abs(got["score"] - want["score"]))
    assert max(diffs) < 1e-5
    assert any(len(by_id[rid]["chunks"]) == 2 for rid in reference)  # the 35 s answers: two chunks, reassembled
    opinion = [by_id[rid] for rid, a in reference.items() if a["part"] == "opinion"]
    assert opinion and all(a["model"]["adapter"].startswith("opinion@") for a in opinion)  # added at run time

    # The candidates file holds the batch endpoint's overall: the same function over the same answers.
    cfg = load_service_config(config)
    parts = part_registry(cfg, config).entries()
    candidates = {c["candidate_id"]: c for c in pq.read_table(out / "candidates.parquet").to_pylist()}
    for cid, c in candidates.items():
        mine = [a for a in answers if a["candidate_id"] == cid]
        scored = [a for a in mine if a["status"] == "scored"]
        levels = {n: p.config.levels for n, p in parts.items()}
        want = candidate_result([result_of_row(a) for a in mine], levels, cfg.candidate)
        failed = sum(1 for a in mine if a["status"] == "failed")
        assert {k: c[k] for k in ("answers", "scored", "not_scorable", "failed", "complete")} == {
            "answers": len(mine),
            "scored": len(scored),
            "not_scorable": len(mine) - len(scored) - failed,
            "failed": failed,
            "complete": not failed,
        }
        assert c["score"] == (pytest.approx(want.score, abs=1e-12) if scored else None)
        assert c["review"] == want.review.model_dump() and c["cefr"] == want.cefr
        assert (c["withheld"], c["rule"]) == (want.withheld, want.rule)
        assert c["withheld_reasons"] == [w.model_dump() for w in want.withheld_reasons]
        assert dict(c["aspects"]) == pytest.approx(want.aspects, abs=1e-12)
    cand1 = candidates["cand-1"]  # silent, corrupt, empty: theirs; the missing file and the unknown part: ours
    assert (cand1["not_scorable"], cand1["failed"], cand1["complete"]) == (3, 2, False)
    assert cand1["review"]["needed"] and cand1["review"]["reasons"][-2:] == ["not_scorable", "incomplete"]
    assert cand1["withheld"] and cand1["score"] is None  # nothing dropped silently: withheld, with the reasons
    assert {w["kind"] for w in cand1["withheld_reasons"]} == {"not_scorable", "incomplete"}

    # 4. Once the missing file is in place, a run scores that answer again (only it), and no other.
    write(session["dir"] / "audio" / "missing.flac", 2.0, 16000, seed=7)
    again = score_session(config, manifest, out)
    assert again.returncode == 1, what_it_said(again)  # the unknown part and the empty field still need fixing
    assert "1 answer(s) of an earlier run failed in a way that may pass now" in again.stderr
    s2 = json.loads(again.stdout.splitlines()[-1])
    assert s2["this_run"]["answers"] == 1 and s2["answers"] == total and s2["duplicates"] == 0
    assert s2["failed"] == {"unknown_part": 1, "invalid_row": 1} and s2["retryable"] == 0
    assert sorted(pq.read_table(out / "answers").column("response_id").to_pylist()) == sorted(ids)
    rescored = [a for a in pq.read_table(out / "answers").to_pylist() if a["response_id"] == RETRYABLE]
    assert [a["status"] for a in rescored] == ["scored"]

    # 5. Once more: finished, said so in seconds (neither Ray nor an engine started), same output.
    started = time.monotonic()
    again = score_session(config, manifest, out)
    assert again.returncode == 1 and "is finished" in again.stderr and "Ray logs" not in again.stderr
    assert time.monotonic() - started < NO_RAY_S
    assert json.loads(again.stdout.splitlines()[-1])["this_run"]["answers"] == 0

    # 6. The folder refuses another session's manifest.
    (session["dir"] / "other.csv").write_text("response_id,candidate_id,part,audio\nx1,c,interview,audio/g0000.wav\n")
    other = score_session(config, session["dir"] / "other.csv", out)
    assert other.returncode == 2 and "holds the results of another session" in other.stderr


# ---------------------------------------------------------------- refusals and finished sessions (no Ray, no engine)

#: Seconds a refusal or a finished session may take: the command's start-up and the checks, never Ray's or an
#: engine's (about 4 s on 2 busy cores; Ray alone took 20 s).
NO_RAY_S = 30


def timed_session(config, manifest, out) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    r = score_session(config, manifest, out, timeout=120)
    return r, time.monotonic() - started


def test_bad_manifests_and_output_folders_are_refused_before_ray_leaving_nothing(config, tmp_path):
    header = "response_id,candidate_id,part,audio\n"
    (tmp_path / "dup.csv").write_text(header + "7,c,interview,a.wav\n7,c,interview,b.wav\n")
    (tmp_path / "cols.csv").write_text("response_id,candidate_id,audio\n1,c,a.wav\n")
    (tmp_path / "cols.jsonl").write_text('{"response_id": "1", "candidate_id": "c", "audio": "a.wav"}\n')
    (tmp_path / "noid.csv").write_text(header + ",c,interview,a.wav\n2,c,interview,b.wav\n")
    (tmp_path / "parts.csv").write_text(header + "1,c,intervew,a.wav\n2,c,intervew,b.wav\n3,c,,c.wav\n")
    (tmp_path / "ok.csv").write_text(header + "1,c,interview,a.wav\n")
    (tmp_path / "rowless.csv").write_text(header)
    (tmp_path / "m.txt").write_text("x")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's")
    (tmp_path / "a-file").write_text("")
    other = tmp_path / "other"
    other.mkdir()
    (other / "session.json").write_text(json.dumps({"manifest": "elsewhere.csv", "answers": 9}))
    cases = {  # manifest, out -> what the one error line says
        ("dup.csv", None): "appear more than once in the manifest, e.g. '7'",
        ("cols.csv", None): "lacks the column(s) part",
        ("cols.jsonl", None): "lacks the column(s) part",
        ("noid.csv", None): "1 row(s) of the manifest have no response_id",
        ("parts.csv", None): "no row of the manifest names a registered part: 2 row(s) name an unknown part "
        "'intervew' (did you mean 'interview'?",
        ("rowless.csv", None): "has no rows: nothing to score",
        ("m.txt", None): "unknown format '.txt'",
        ("absent.csv", None): "not found",
        ("bad.parquet", None): "cannot read the manifest",
        ("ok.csv", "foreign"): "is not empty and holds no session (notes.txt)",
        ("ok.csv", "a-file"): "is a file",
        ("ok.csv", "other"): "holds the results of another session (changed: ",
    }
    for (name, out_name), message in cases.items():
        out = tmp_path / (out_name or f"out-{name}")
        before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        r, took = timed_session(config, tmp_path / name, out)
        lines = [x for x in r.stderr.splitlines() if x.startswith("l2grader: error:")]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (name, out_name, r.stderr[-2000:])
        assert "Ray logs" not in r.stderr and took < NO_RAY_S, (name, out_name, took)
        if out_name is None:
            assert not out.exists(), (name, "a refused run left its output folder behind")
        elif before is not None:
            assert sorted(p.name for p in out.iterdir()) == before, (name, out_name)  # untouched


def finished_folder(config, tmp_path, rows: list[tuple[str, dict]]) -> tuple[Path, Path]:
    """A manifest of ``rows`` (response id -> what the output holds for it: a ScoredAnswer or error kind) and an
    output folder that a run of it wrote to the end."""
    from serve.service.settings import load_service_config, part_registry
    from serve.session.run import session_identity
    from serve.session.schema import ANSWER_SCHEMA
    from serve.session.stages import answer_row
    from serve.session.store import OutputDir

    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest, out = tmp_path / "m.csv", tmp_path / "out"
    table = [{"response_id": rid, "candidate_id": "c", "part": "interview", "audio": f"{rid}.wav"} for rid, _ in rows]
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    cfg = load_service_config(config)
    store = OutputDir(str(out))
    store.record_session(
        session_identity(cfg, part_registry(cfg, config).entries(), str(manifest), [r for r, _ in rows])
    )
    written = [
        answer_row(row, result) if not isinstance(result, str) else answer_row(row, kind=result, message="m")
        for row, (_, result) in zip(table, rows)
    ]
    writer = store.part_writer(1024, 60)
    writer.add(pa.Table.from_pylist(written, schema=ANSWER_SCHEMA))
    writer.flush()
    return manifest, out


def test_a_finished_session_run_again_starts_neither_ray_nor_an_engine(config, tmp_path):
    from tests.test_pipeline import an_answer

    answer = an_answer(seconds=12).model_copy(update={"part": "interview"})
    manifest, out = finished_folder(config, tmp_path, [("1", answer), ("2", "silence")])
    r, took = timed_session(config, manifest, out)
    assert r.returncode == 0, what_it_said(r)
    assert "is finished: all 2 answers of the manifest are there" in r.stderr
    assert "Ray logs" not in r.stderr and took < NO_RAY_S, took
    s = json.loads(r.stdout.splitlines()[-1])
    assert (s["answers"], s["scored"], s["not_scorable"], s["failed"], s["this_run"]["answers"]) == (
        2,
        1,
        {"silence": 1},
        {},
        0,
    )
    (c,) = pq.read_table(out / "candidates.parquet").to_pylist()
    assert (c["scored"], c["not_scorable"], c["failed"], c["complete"]) == (1, 1, 0, True)
    # the default rule: an unscorable answer withholds the candidate's result, with the reason, never drops out
    assert c["score"] is None and c["withheld"] and "not_scorable" in c["review"]["reasons"]
    assert [w["kind"] for w in c["withheld_reasons"]] == ["not_scorable"]


def test_a_session_with_nothing_scored_or_a_failed_answer_exits_non_zero(config, tmp_path):
    manifest, out = finished_folder(config, tmp_path / "a", [("1", "silence"), ("2", "undecodable")])
    r, took = timed_session(config, manifest, out)
    assert r.returncode == 1 and "error: no answer of the session could be scored" in r.stderr, what_it_said(r)
    assert took < NO_RAY_S

    # A manifest row the grader cannot score is the grader's failure, not the candidate's: counted apart, and the
    # candidate's result says it is incomplete.
    from tests.test_pipeline import an_answer

    answer = an_answer(seconds=12).model_copy(update={"part": "interview"})
    manifest, out = finished_folder(config, tmp_path / "b", [("1", answer), ("2", "unknown_part")])
    r, took = timed_session(config, manifest, out)
    assert r.returncode == 1 and took < NO_RAY_S, what_it_said(r)
    assert "error: the grader failed to score 1 answer(s) (unknown_part 1)" in r.stderr
    assert "retry" not in r.stderr.split("error:")[-1]  # not retryable: the manifest needs fixing
    s = json.loads(r.stdout.splitlines()[-1])
    assert (s["not_scorable"], s["failed"], s["retryable"]) == ({}, {"unknown_part": 1}, 0)
    (c,) = pq.read_table(out / "candidates.parquet").to_pylist()
    assert (c["scored"], c["not_scorable"], c["failed"], c["complete"]) == (1, 0, 1, False)
    assert "incomplete" in c["review"]["reasons"] and "not_scorable" not in c["review"]["reasons"]


def test_retryable_failures_are_taken_out_of_their_parts_to_be_scored_again(config, tmp_path):
    from serve.session.store import OutputDir

    rows = [("1", "silence"), ("2", "engine_error"), ("3", "invalid_row"), ("4", "unreadable")]
    _, out = finished_folder(config, tmp_path, rows)
    store = OutputDir(str(out))
    assert store.retryable() == 2
    assert store.drop_retryable() == 2
    assert store.done_ids() == {"1", "3"} and store.retryable() == 0
    assert [p.name for p in (out / "answers").iterdir() if p.name.startswith(".")] == []  # rewritten whole


def test_throughput_is_measured_over_the_scoring_not_over_bursts_of_arrivals():
    from serve.session.run import Progress
    from serve.session.schema import ANSWER_SCHEMA
    from serve.session.stages import SCORING_FROM, SCORING_TO

    def batch(n: int, began: float, ended: float) -> pa.Table:
        rows = [{"response_id": str(i), "status": "scored", "duration_s": 2.0} for i in range(n)]
        t = pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA)
        return t.append_column(SCORING_FROM, pa.array([began] * n)).append_column(SCORING_TO, pa.array([ended] * n))

    # Three batches of 64 scored over 10 s each (one engine), handed to the driver at once: 6.4 answers/s, not
    # the thousands the span between their arrivals gave.
    progress = Progress(192, every_s=3600)
    for i in range(3):
        progress.add(batch(64, 1000.0 + 10 * i, 1010.0 + 10 * i))
    rate, span = progress.steady()
    assert span == 30.0 and rate == pytest.approx(6.4)
    assert progress.rate(1030.0) == pytest.approx(6.4) and progress.audio_s == 384.0


# ---------------------------------------------------------------- sources (no Ray)


def test_manifest_formats_and_audio_locations(tmp_path):
    assert [manifest_format(x) for x in ("m.csv", "m.jsonl", "s3://b/m.parquet", "s3://b/manifest/")] == [
        "csv",
        "json",
        "parquet",
        "parquet",
    ]
    assert resolve_audio("a/b.wav", str(tmp_path)) == str(tmp_path / "a" / "b.wav")
    assert resolve_audio("a/b.wav", "s3://bucket/session") == "s3://bucket/session/a/b.wav"
    assert resolve_audio("/abs/b.wav", "s3://bucket") == "/abs/b.wav"
    assert resolve_audio("gs://x/y.wav", str(tmp_path)) == "gs://x/y.wav"

    f = write(tmp_path / "a.wav", 1.0)
    assert read_audio(str(f), 10**6) == f.read_bytes() == read_audio(f"file://{f}", 10**6)
    for location, max_bytes, kind in (
        (str(tmp_path / "none.wav"), 10**6, "unreadable"),
        (str(tmp_path), 10**6, "unreadable"),
        (str(f), 100, "too_large"),
        (f"file://{tmp_path}/none.wav", 10**6, "unreadable"),
    ):
        with pytest.raises(AudioError) as e:
            read_audio(location, max_bytes)
        assert e.value.kind == kind, location
