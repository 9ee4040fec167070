"""The Speak & Improve 2025 recipe on a small corpus written in the release's own layout.

The layout reader, the mark mapping, the combination of a part's responses and the challenge's output format are
checked without a model (fast), and so is ``sandi run``'s hand-over of files between its steps (the steps mocked);
one engine test runs ``sandi run`` end to end on the tiny checkpoint: prepare, train, calibrate, predict.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from adapters import sandi
from adapters.dataset import DataError, read_jsonl
from tests.conftest import l2grader, what_it_said

# submission -> {part: number of responses}; part marks; a dev submission without part 4 is incomplete
TRAIN = {f"SI100A-{n:05d}": {"P1": 3, "P3": 1, "P4": 1, "P5": 2} for n in range(1, 7)}
DEV = {f"SI200B-{n:05d}": {"P1": 3, "P3": 1, "P4": 1, "P5": 2} for n in range(1, 4)}
DEV["SI200B-00009"] = {"P1": 3, "P3": 1, "P5": 2}  # incomplete: no part 4, no overall mark
FIRST = {"P1": 10003, "P3": 30017, "P4": 40018, "P5": 50019}
SECONDS = 2.0


def mark_of(sub: str, part: str) -> float:
    """A half-step mark from 2.0 to 5.0 that differs by submission and part."""
    n = int(sub[-2:]) + int(part[1])
    return 2.0 + 0.5 * (n % 7)


def write_release(root: Path, *, audio: bool = True, marks_names: dict[str, str] | None = None) -> Path:
    """A release: FLAC under data/flac/SPLIT/, the file lists (paths written as ./data/..., data/... and
    flac/..., all relative to the root), the marks per split and part in a shuffled order."""
    import soundfile as sf

    from tests.audio_fixtures import speechlike

    flists, marks_dir = root / sandi.FLISTS, root / sandi.MARKS
    flists.mkdir(parents=True)
    marks_dir.mkdir(parents=True)
    seed = 0
    for split, subs in (("train", TRAIN), ("dev", DEV)):
        lines: dict[str, list[str]] = {p: [] for p in (*sandi.PARTS, "overall")}
        for sub, parts in subs.items():
            for part, n in parts.items():
                for k in range(n):
                    fid = f"{sub}-P{FIRST[part] + k}"
                    rel = Path("data") / "flac" / split / sub / f"{fid}.flac"
                    if audio:
                        (root / rel).parent.mkdir(parents=True, exist_ok=True)
                        sf.write(root / rel, speechlike(SECONDS, 16000, seed), 16000, format="FLAC")
                    seed += 1
                    written = [f"./{rel}", str(rel), str(rel.relative_to("data"))][seed % 3]
                    lines[part].append(f"{fid}\t{written}")
                    if len(parts) == 4:
                        lines["overall"].append(f"{fid}\t{written}")
        for name, rows in lines.items():
            (flists / f"{split}-sla-{name}.tsv").write_text("\n".join(rows) + "\n")
        order = list(subs)[::-1]  # not sorted: predictions must follow the marks file
        for part in (*sandi.PARTS, "overall"):
            rows = [
                f"{s}\t{(np.mean([mark_of(s, p) for p in sandi.PARTS]) if part == 'overall' else mark_of(s, part)):.3f}"
                for s in order
                if (part in subs[s] if part != "overall" else len(subs[s]) == 4)
            ]
            name = (marks_names or {}).get(f"{split}-{part}", f"{split}-sla-marks-{part}.tsv")
            (marks_dir / name).write_text("submission\tscore\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_release(tmp_path_factory.mktemp("sandi") / "release")


@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    sandi.prepare(release, out, held_out=0.2, seed=0)
    return out


# --- the layout, without a model ---


def test_marks_files_are_found_by_split_and_part_words(tmp_path):
    d = tmp_path / sandi.MARKS
    d.mkdir(parents=True)
    for name in ("SLA_train_P1.tsv", "dev-P1-marks.tsv", "dev-P10-other.tsv", "train.overall.tsv", "notes.txt"):
        (d / name).write_text("S-1\t3.0\n")
    assert sandi.find_marks(tmp_path, "train", "P1").name == "SLA_train_P1.tsv"
    assert sandi.find_marks(tmp_path, "dev", "P1").name == "dev-P1-marks.tsv"  # P10 is not P1
    assert sandi.find_marks(tmp_path, "train", "overall").name == "train.overall.tsv"
    with pytest.raises(DataError, match=r"no marks file for dev P3 .*found: SLA_train_P1.tsv, dev-P1-marks.tsv"):
        sandi.find_marks(tmp_path, "dev", "P3")
    (d / "old" / "dev-P1.tsv").parent.mkdir()
    (d / "old" / "dev-P1.tsv").write_text("S-1\t3.0\n")
    with pytest.raises(DataError, match=r"2 marks files for dev P1, one expected: dev-P1-marks.tsv, old/dev-P1.tsv"):
        sandi.find_marks(tmp_path, "dev", "P1")
    with pytest.raises(DataError, match="no marks folder"):
        sandi.find_marks(tmp_path / "elsewhere", "dev", "P1")


def test_marks_keep_their_order_skip_a_header_and_stay_on_the_scale(tmp_path):
    f = tmp_path / "m.tsv"
    f.write_text("id\tscore\nB-2\t4.500\nA-1\t2.000\n\n")
    assert list(sandi.read_marks(f).items()) == [("B-2", 4.5), ("A-1", 2.0)]
    f.write_text("B-2\t6.5\n")
    with pytest.raises(DataError, match=r"m.tsv:1: mark 6.5 outside the corpus's 0-6 scale"):
        sandi.read_marks(f)
    f.write_text("B-2\t4.0\nB-2\t3.0\n")
    with pytest.raises(DataError, match="B-2 marked twice"):
        sandi.read_marks(f)


def test_response_ids_name_their_submission_and_part():
    assert sandi.submission_of("SI114J-00011-P10003") == "SI114J-00011"
    assert [sandi.part_of(f"SI114J-00011-P{n}") for n in (10003, 30017, 40018, 50023)] == ["P1", "P3", "P4", "P5"]
    with pytest.raises(ValueError, match="no part suffix"):
        sandi.part_of("SI114J-00011-X1")


def test_file_list_paths_resolve_with_or_without_a_leading_dot_or_data(tmp_path):
    rel = Path("data/flac/dev/S-1/S-1-P10003.flac")
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_bytes(b"x")
    for written in (str(rel), f"./{rel}", "flac/dev/S-1/S-1-P10003.flac", f"././{rel}"):
        assert sandi.audio_path(tmp_path, written) == tmp_path / rel, written
    # a release whose root is data/ itself, listed with data/ paths
    assert sandi.audio_path(tmp_path / "data", str(rel)) == tmp_path / rel
    flist = tmp_path / "dev-sla-P1.tsv"
    flist.write_text(f"S-1-P10003\t./{rel}\nS-1-P10004\tdata/flac/dev/S-1/S-1-P10004.flac\n")
    with pytest.raises(
        DataError, match=r"dev-sla-P1.tsv:2: audio file data/flac/dev/S-1/S-1-P10004.flac not found .*1 of"
    ):
        sandi.read_flist(flist, tmp_path, "P1")
    flist.write_text(f"S-1-P30017\t{rel}\n")
    with pytest.raises(DataError, match="response S-1-P30017 is of part P3, the list of part P1"):
        sandi.read_flist(flist, tmp_path, "P1")


def test_prepare_writes_each_response_with_its_part_mark(prepared):
    summary = json.loads((prepared / "prepare.json").read_text())
    calib = {ex.speaker for ex in read_jsonl(sandi.data_file(prepared, "calib", "P1"))}
    train = {ex.speaker for ex in read_jsonl(sandi.data_file(prepared, "train", "P1"))}
    assert len(calib) == 1 and len(train) == 5 and not calib & train  # 20 % of 6 submissions, whole
    for part in sandi.PARTS:
        # the same submissions are held out in every part
        assert {ex.speaker for ex in read_jsonl(sandi.data_file(prepared, "calib", part))} == calib
        rows = [json.loads(x) for x in sandi.data_file(prepared, "train", part).read_text().splitlines()]
        assert all(r["score"] == mark_of(r["speaker"], part) and r["part"] == part for r in rows)
        assert all(Path(r["audio"]).is_file() and r["response"].startswith(r["speaker"] + "-P") for r in rows)
    p1 = [json.loads(x) for x in sandi.data_file(prepared, "dev", "P1").read_text().splitlines()]
    assert len(p1) == 12 and len({r["speaker"] for r in p1}) == 4  # three responses each, one mark each
    assert summary["dev"]["P4"] == {"responses": 3, "submissions": 3, "unmarked_responses": 0}
    assert summary["dev"]["overall_marks"] == summary["dev"]["complete_submissions"] == 3
    assert list(sandi.read_marks(sandi.marks_copy(prepared, "dev", "P1"))) == list(DEV)[::-1]
    for part in (*sandi.PARTS, "overall"):  # the held-out submissions' marks, to predict --split calib against
        assert set(sandi.read_marks(sandi.marks_copy(prepared, "calib", part))) == calib


def test_prepare_says_which_marks_file_is_missing(tmp_path):
    root = write_release(tmp_path / "r", audio=False, marks_names={"dev-P3": "dev-sla-marks-P3.txt"})
    with pytest.raises(DataError, match=r"audio file \S+SI100A-00001-P10003.flac not found"):
        sandi.prepare(root, tmp_path / "out")
    root = write_release(tmp_path / "r2", marks_names={"dev-P3": "dev-sla-marks-P3.txt"})
    with pytest.raises(DataError, match=r"no marks file for dev P3 .*found: .*dev-sla-marks-P1.tsv"):
        sandi.prepare(root, tmp_path / "out2")


def test_a_parts_responses_are_combined_by_their_mean_and_the_overall_needs_all_four():
    part = sandi.submission_scores([("A", 3.0), ("A", 4.0), ("B", 2.0), ("A", 5.0)])
    assert part == {"A": 4.0, "B": 2.0}
    parts = {"P1": {"A": 4.0, "B": 2.0}, "P3": {"A": 3.0, "B": 2.0}, "P4": {"A": 5.0}, "P5": {"B": 3.0, "A": 4.0}}
    assert sandi.overall_scores(parts, ["B", "A"]) == {"A": 4.0}  # B has no part 4
    filled = sandi.in_marks_order({"A": 4.0, "C": 2.0}, {"C": 3.0, "B": 3.5, "A": 4.0}, "P1")
    assert list(filled.items()) == [("C", 2.0), ("B", 3.0), ("A", 4.0)]  # B: the part's mean prediction


def test_the_marks_scale_is_the_levels_scale():
    from serve.grading.levels import DEFAULT_LEVELS

    sandi.check_scale("P1", DEFAULT_LEVELS)
    shifted = [lv.model_copy(update={"score": lv.score - 1}) for lv in DEFAULT_LEVELS]
    with pytest.raises(ValueError, match=r"part P3: its levels must score A1..C1 .* found A1=0.0"):
        sandi.check_scale("P3", shifted)


def test_prediction_files_and_the_challenges_table(prepared, tmp_path):
    """Predictions in the challenge's format, scored against the marks by ``sandi score``."""
    preds = tmp_path / "preds"
    written = {}
    for part in sandi.PARTS:
        marks = sandi.read_marks(sandi.marks_copy(prepared, "dev", part))
        written[part] = {s: m + 0.25 * (i % 2) - 0.1 for i, (s, m) in enumerate(marks.items())}
        sandi.write_tsv(sandi.prediction_file(preds, "dev", part), written[part])
    order = list(sandi.read_marks(sandi.marks_copy(prepared, "dev", "overall")))
    sandi.write_tsv(sandi.prediction_file(preds, "dev", "overall"), sandi.overall_scores(written, order))
    text = sandi.prediction_file(preds, "dev", "P1").read_text()
    assert re.fullmatch(r"(SI200B-\d{5}\t\d\.\d{3}\n){4}", text) and text.startswith("SI200B-00009\t")
    r = l2grader("sandi", "score", "--prepared", prepared, "--predictions", preds, timeout=120)
    assert r.returncode == 0, what_it_said(r)
    out = r.stdout.splitlines()
    assert re.search(r"\bn\s+RMSE\s+PCC\s+SRC\s+KRC\s+LESS05\s+LESS1$", out[1])
    assert [line.split()[0] for line in out[2:7]] == [*sandi.PARTS, "overall"]
    assert out[6].split()[1] == "3"  # the complete submissions only
    assert "challenge baseline" in r.stdout and "0.444" in r.stdout and "0.364" in r.stdout
    result = json.loads(out[-1])["metrics"]
    expected = sandi.metrics(written["P1"], sandi.read_marks(sandi.marks_copy(prepared, "dev", "P1")))
    assert result["P1"] == pytest.approx(expected)
    assert result["P1"]["less05"] == 100.0 and result["P1"]["rmse"] == pytest.approx(np.sqrt((0.01 + 0.0225) / 2))


def test_run_chains_prepare_train_calibrate_and_predict(release, tmp_path, monkeypatch):
    """``sandi run`` hands each step the files of the one before (the steps themselves mocked: no model)."""
    import adapters.evaluate
    import adapters.train
    from serve.grading.config import load_config

    calls = []
    monkeypatch.setattr(adapters.train, "train", lambda cfg, opts: calls.append(("train", opts)) or {})
    monkeypatch.setattr(adapters.train, "format_summary", lambda summary: "")
    monkeypatch.setattr(
        adapters.evaluate, "calibrate", lambda cfg, part, data, **kw: calls.append(("calibrate", part, data, kw))
    )
    monkeypatch.setattr(sandi, "predict", lambda cfg, data, out, **kw: calls.append(("predict", data, out, kw)))
    monkeypatch.setattr(sandi, "adapters_for", lambda cfg, adapters: ("engine config", adapters))

    class Engine:  # the one engine the calibrations and the predictions share
        def __init__(self, cfg):
            calls.append(("engine", cfg))
            self.open = True

        def shutdown(self):
            self.open = False

    import serve.engine.offline

    monkeypatch.setattr(serve.engine.offline, "OfflineEngine", Engine)
    cfg = load_config(Path(__file__).parent.parent / "configs" / "speak-and-improve-2025.yaml")
    sandi.run(cfg, release, tmp_path, train_options={"epochs": 0.5}, allow_small=True, held_out=0.2)
    data = tmp_path / "data"
    adapters = {p: tmp_path / "adapters" / p for p in sandi.PARTS}
    assert [(c[1].part, c[1].data, c[1].out, c[1].epochs) for c in calls[:4]] == [
        (p, str(sandi.data_file(data, "train", p)), str(adapters[p]), 0.5) for p in sandi.PARTS
    ]
    assert calls[4] == ("engine", ("engine config", adapters))  # started once, after training, with every adapter
    engine = calls[5][3]["engine"]
    assert [(c[1], c[2], c[3]["adapter"], c[3]["allow_small"]) for c in calls[5:9]] == [
        (p, sandi.data_file(data, "calib", p), adapters[p], True) for p in sandi.PARTS
    ]
    assert all(c[3]["engine"] is engine for c in calls[5:9])
    assert calls[9][:3] == ("predict", data, tmp_path / "predictions") and calls[9][3]["split"] == "dev"
    assert calls[9][3]["adapters"] == adapters and calls[9][3]["engine"] is engine
    assert not engine.open  # shut down at the end


def test_recipe_commands_refuse_a_config_without_the_four_parts(tmp_path):
    demo = Path(__file__).parent.parent / "configs" / "demo.yaml"
    r = l2grader("sandi", "predict", "--config", demo, "--prepared", tmp_path, "--out", tmp_path)
    assert r.returncode == 2 and "needs parts P1, P3, P4, P5; missing P1, P3, P4, P5" in r.stderr


# --- the recipe end to end on the tiny checkpoint ---


@pytest.mark.engine
def test_recipe_runs_end_to_end_in_the_challenges_format(release, tiny_config, tmp_path):
    """``sandi run`` on the tiny checkpoint: prepare the release, train an adapter per part (one epoch), calibrate
    each on the held-out submission (P1 and P5 hold 3 and 2 of its responses; P3 and P4 one each, too few: left
    uncalibrated with a warning), predict dev with one engine for the calibrations and the predictions, and write
    the challenge's files and table. What is checked (the files, their order and format, the overall of the
    complete submissions, which adapter scored) does not depend on how well the tiny model learns."""
    import yaml

    from serve.grading.adapter_files import check_adapter

    raw = tiny_config()
    recipe = yaml.safe_load((Path(__file__).parent.parent / "configs" / "speak-and-improve-2025.yaml").read_text())
    raw["parts"] = {p: {k: v for k, v in c.items() if k != "adapter"} for p, c in recipe["parts"].items()}
    config = tmp_path / "sandi.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    t = time.time()
    args = ["--config", config, release, out, "--held-out", "0.2", "--epochs", "1", "--allow-small"]
    r = l2grader("sandi", "run", *args, env=env, timeout=600)
    assert r.returncode == 0, what_it_said(r)
    print(f"sandi run {time.time() - t:.1f} s")
    data, adapters, predictions = out / "data", out / "adapters", out / "predictions"

    # trained, one adapter per part, on that part's train answers (the held-out submission left out)
    for part in sandi.PARTS:
        assert f"trained '{part}' adapter -> {adapters / part}" in r.stdout + r.stderr
        summary = json.loads((adapters / part / "training_summary.json").read_text())
        assert summary["train_answers"] == len(read_jsonl(sandi.data_file(data, "train", part), part)), summary
    # calibrated where the held-out submission gave two answers or more, by the adapter trained here
    for part in ("P1", "P5"):
        cal = json.loads((adapters / part / "calibration.json").read_text())
        assert cal["fingerprint"]["adapter"] == check_adapter(adapters / part).content_hash
        assert cal["data"] == str(sandi.data_file(data, "calib", part))
    for part in ("P3", "P4"):
        assert not (adapters / part / "calibration.json").exists()
        assert f"WARNING: {part} not calibrated" in r.stderr
    log = re.search(r"l2grader: engine log: (\S+)", r.stderr)
    assert log and Path(log[1]).read_text().count("Initializing a V1 LLM engine") == 1  # one engine for it all

    for part in sandi.PARTS:
        lines = sandi.prediction_file(predictions, "dev", part).read_text().splitlines()
        marks = sandi.read_marks(sandi.marks_copy(data, "dev", part))
        assert [x.split("\t")[0] for x in lines] == list(marks)
        assert all(re.fullmatch(r"\d\.\d{3}", x.split("\t")[1]) for x in lines)
        assert all(1.0 <= float(x.split("\t")[1]) <= 6.0 for x in lines)
    overall = sandi.read_marks(sandi.prediction_file(predictions, "dev", "overall"))
    assert list(overall) == [s for s in list(DEV)[::-1] if len(DEV[s]) == 4]  # the incomplete one left out
    parts = {p: sandi.read_marks(sandi.prediction_file(predictions, "dev", p)) for p in sandi.PARTS}
    for sub, score in overall.items():
        assert score == pytest.approx(np.mean([parts[p][sub] for p in sandi.PARTS]), abs=2e-3)
    assert "UNTRAINED" in r.stdout and "challenge baseline" in r.stdout
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["split"] == "dev" and [result["metrics"][p]["n"] for p in (*sandi.PARTS, "overall")] == [
        4,
        4,
        3,
        4,
        3,
    ]
    assert set(result["metrics"]["overall"]) == {"n", "rmse", "pcc", "src", "krc", "less05", "less1"}
