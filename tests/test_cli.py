"""``l2grader make-tiny-model`` and ``l2grader score`` run as a user runs them (real processes, real engine)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from serve.grading import calibration
from serve.grading.adapter_files import check_adapter
from serve.grading.config import PartConfig
from serve.grading.fingerprint import score_fingerprint
from serve.grading.results import NotScorable, Overall, ScoredAnswer
from serve.service.options import ALLOW_HA_PROXY_ENV, ha_proxy_refusal
from serve.service.settings import load_service_config, part_registry
from tests.conftest import l2grader


def run(*args, timeout=300):
    return l2grader(*args, timeout=timeout)


def is_command(parser, name: str) -> bool:
    """Whether ``l2grader NAME --help`` is a command's help (exit 0), not an invalid choice (exit 2)."""
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([name, "--help"])
    return exit_.value.code == 0


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("l2grader: error:")]


def test_make_tiny_model_writes_a_ready_config(tmp_path):
    r = run("make-tiny-model", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t" / "demo.yaml").is_file()
    assert (tmp_path / "t" / "model" / "config.json").is_file()


def test_unknown_part_fails_fast_with_one_line(tiny_dir, audio_dir):
    r = run("score", "--config", tiny_dir / "demo.yaml", "--part", "nope", audio_dir / "a.wav", timeout=60)
    assert r.returncode == 2
    assert error_lines(r.stderr) == [
        "l2grader: error: unknown part 'nope' (known parts: interview (config), long_turn (config))"
    ]


def test_a_mistyped_part_is_named_with_the_part_it_may_have_meant(tiny_dir, audio_dir):
    r = run("score", "--config", tiny_dir / "demo.yaml", "--part", "intervew", audio_dir / "a.wav", timeout=60)
    assert r.returncode == 2
    assert error_lines(r.stderr) == [
        "l2grader: error: unknown part 'intervew' "
        "(did you mean 'interview'? known parts: interview (config), long_turn (config))"
    ]


def test_bad_config_fails_with_one_line(tmp_path, audio_dir):
    (tmp_path / "c.yaml").write_text("model: {base: m}\nparts: {}\n")
    r = run("score", "--config", tmp_path / "c.yaml", "--part", "p", audio_dir / "a.wav", timeout=60)
    assert r.returncode == 2 and len(error_lines(r.stderr)) == 1 and "parts" in r.stderr


@pytest.mark.engine
def test_score_candidate_prints_the_withheld_overall_result_last(tiny_dir, audio_dir):
    """--candidate with files that cannot be scored (no engine starts): the overall result, withheld with the
    reason, after one object per file, as the batch endpoint's overall."""
    files = [audio_dir / "silent.wav", audio_dir / "corrupt.wav"]
    r = run("score", "--config", tiny_dir / "demo.yaml", "--part", "interview", "--candidate", "c7", *files)
    assert r.returncode == 1, r.stderr[-3000:]
    *answers, last = (json.loads(line) for line in r.stdout.splitlines())
    assert [a["status"] for a in answers] == ["not_scorable", "not_scorable"]
    assert last["candidate_id"] == "c7" and set(last["overall"]) == set(Overall.model_fields)
    overall = last["overall"]
    assert (overall["score"], overall["withheld"], overall["not_scorable"]) == (None, True, 2)
    assert {(w["kind"], w["part"]) for w in overall["withheld_reasons"]} == {("not_scorable", "interview")}


def test_score_batch_with_bad_files(tiny_dir, tiny_config, audio_dir, tmp_path):
    files = ["a.wav", "corrupt.wav", "b.flac", "empty.wav", "c.ogg", "silent.wav", "d.mp3", "a.wav"]
    r = run("score", "--config", tiny_dir / "demo.yaml", "--part", "interview", *(audio_dir / f for f in files))
    assert r.returncode == 1, r.stderr[-3000:]
    every = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(x["file"]).name for x in every] == files  # one object per file, in order
    refused = [x for x in every if x["status"] != "scored"]
    assert [(Path(x["file"]).name, x["status"], x["reason"]["kind"]) for x in refused] == [
        ("corrupt.wav", "not_scorable", "undecodable"),
        ("empty.wav", "not_scorable", "empty"),
        ("silent.wav", "not_scorable", "silence"),
    ]
    assert all(set(x) == {"file", *NotScorable.model_fields} for x in refused)  # a batch's not_scorable result
    results = [x for x in every if x["status"] == "scored"]
    assert [Path(x["file"]).name for x in results] == ["a.wav", "b.flac", "c.ogg", "d.mp3", "a.wav"]
    for x in results:
        assert set(x) == {"file", *ScoredAnswer.model_fields}  # the whole answer, as every door gives it
        assert x["status"] == "scored" and x["quality"]["speech_s"] > 0 and isinstance(x["review"]["needed"], bool)
        assert abs(sum(x["probabilities"].values()) - 1) < 1e-4
        assert 1.0 <= x["score"] <= 6.0
        assert x["model"]["untrained"] is True and x["model"]["adapter"].startswith("interview@")
    # Same file, same numbers (to float32 rounding: batch composition changes summation order).
    assert results[0]["probabilities"] == pytest.approx(results[-1]["probabilities"], abs=1e-6)
    by_name = {Path(x["file"]).name: x for x in results}
    assert len(by_name["b.flac"]["chunks"]) == 3  # 75 s
    assert len(by_name["a.wav"]["chunks"]) == 1  # 20 s
    assert by_name["b.flac"]["duration_s"] == pytest.approx(75, abs=0.05)
    errors = error_lines(r.stderr)
    assert len(errors) == 3
    assert "l2grader: WARNING: scoring with the tiny UNTRAINED demo checkpoint" in r.stderr
    engine_log = re.search(r"l2grader: engine log: (\S+)", r.stderr)
    assert engine_log and "vllm" in Path(engine_log[1]).read_text()  # vLLM's lines went to the file ...
    assert [line for line in r.stderr.splitlines() if not line.startswith("l2grader: ")] == []  # ... and the rest
    assert "corrupt.wav: the audio cannot be decoded" in errors[0]
    assert "empty.wav: the audio is empty" in errors[1]
    assert "silent.wav: the audio is silent" in errors[2]

    # A second run (a new engine), of a part added at run time (in the registry file, as PUT /v1/parts adds it)
    # with interview's adapter and task: scored under its own model id, with the same numbers. (That the other
    # demo part gives different ones is checked against the real service: tests/test_service.py.)
    # Its adapter (a copy of interview's) has a calibration made for exactly this set-up: the answer carries it.
    raw = tiny_config()
    raw["serving"] = {"registry_file": str(tmp_path / "registry.json")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    interview = raw["parts"]["interview"]
    shutil.copytree(interview["adapter"], tmp_path / "adapter")
    cfg = load_service_config(tmp_path / "c.yaml")
    added_cfg = PartConfig(adapter=tmp_path / "adapter", task=interview["task"], aspects=interview["aspects"])
    part_registry(cfg, tmp_path / "c.yaml").put("added", added_cfg)
    fp = score_fingerprint(
        added_cfg,
        check_adapter(tmp_path / "adapter").content_hash,
        base=cfg.model.base,
        audio=cfg.audio,
        engine=cfg.engine,
    )
    rng = np.random.default_rng(0)
    human = rng.uniform(1, 6, 200)
    calibration.write(
        calibration.fit("added", fp, (1.0, 6.0), range(1, 7), human, human + rng.normal(0, 0.4, 200), [0.5] * 200),
        tmp_path / "adapter",
    )
    again = run("score", "--config", tmp_path / "c.yaml", "--part", "added", "--candidate", "c1", audio_dir / "b.flac")
    assert again.returncode == 0, again.stderr[-2000:]
    added, last = (json.loads(line) for line in again.stdout.splitlines())
    # --candidate: the files' overall result last, as the batch endpoint's (the default rule: one part, weight 1)
    assert last["candidate_id"] == "c1" and set(last["overall"]) == set(Overall.model_fields)
    assert last["overall"]["score"] == pytest.approx(added["score"]) and not last["overall"]["withheld"]
    assert last["overall"]["interval"]["low"] == pytest.approx(added["interval"]["low"])
    assert last["overall"]["interval"]["coverage"] == pytest.approx(added["interval"]["coverage"])
    assert added["interval_status"] == "calibrated" and added["interval"]["method"] == "mondrian"
    assert added["interval"]["calibrated_on"] == 200 and added["interval"]["low"] < added["score"]
    assert added["model"]["adapter"].startswith("added@")
    assert added["model"]["adapter_hash"] == by_name["b.flac"]["model"]["adapter_hash"]
    assert added["probabilities"] == pytest.approx(by_name["b.flac"]["probabilities"], abs=1e-6)


def test_calibrate_candidates_then_check_says_whether_the_overall_interval_is_calibrated(tiny_config, tmp_path):
    """`l2grader calibrate-candidates` (no engine) writes the file candidate.calibration names, fitted for the rule
    and the parts' real adapters; `check` says it serves, and stale (naming the part and component) once a part's
    adapter is replaced."""
    raw = tiny_config()
    for name in ("interview", "long_turn"):
        shutil.copytree(raw["parts"][name]["adapter"], tmp_path / name)
        raw["parts"][name]["adapter"] = str(tmp_path / name)
    raw["candidate"] = {
        "parts": {"interview": {"weight": 2}, "long_turn": {"weight": 1}},
        "calibration": {"path": "cal/candidates.json", "method": "absolute"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    rng = np.random.default_rng(1)
    machine = rng.uniform(1.5, 5.5, 40)
    (tmp_path / "m.csv").write_text("candidate_id,score\n" + "".join(f"c{i},{m}\n" for i, m in enumerate(machine)))
    human = np.clip(machine + rng.normal(0, 0.3, len(machine)), 1, 6)  # human scores are on the scale
    (tmp_path / "h.tsv").write_text("candidate_id\tscore\n" + "".join(f"c{i}\t{h}\n" for i, h in enumerate(human)))
    args = ("calibrate-candidates", "--config", tmp_path / "c.yaml", "--candidates", tmp_path / "m.csv")
    r = run(*args, "--human", tmp_path / "h.tsv", timeout=120)
    assert r.returncode == 1 and "--allow-small" in r.stderr, r.stdout + r.stderr  # 40 candidates: too few for 90 %
    r = run(*args, "--human", tmp_path / "h.tsv", "--allow-small", timeout=120)
    assert r.returncode == 0 and (tmp_path / "cal" / "candidates.json").is_file(), r.stdout + r.stderr
    assert "calibrated on 40 candidates" in r.stdout and "absolute" in r.stdout
    r = run("check", "--config", tmp_path / "c.yaml", timeout=120)
    assert r.returncode == 0 and "candidates' overall interval: calibrated (absolute, 90%)" in r.stdout, r.stdout
    assert "small sample: 40 of the 102 candidates needed" in r.stdout
    shutil.rmtree(tmp_path / "long_turn")
    shutil.copytree(tmp_path / "interview", tmp_path / "long_turn")  # another adapter for long_turn
    r = run("check", "--config", tmp_path / "c.yaml", timeout=120)
    assert r.returncode == 0 and "candidates' overall interval: stale_calibration" in r.stdout, r.stdout
    assert "long_turn.adapter" in r.stdout and "union bound serves instead" in r.stdout


def test_check_says_which_parts_have_a_valid_calibration_and_why_not(tiny_dir, tiny_config, tmp_path):
    """`l2grader check` (no engine): a calibration made for the config is valid; after the part's task, a level's
    descriptor or the audio rules change it is stale, naming what changed; interval.require makes that fatal."""
    raw = tiny_config()
    raw["parts"] = {"interview": raw["parts"]["interview"]}
    shutil.copytree(raw["parts"]["interview"]["adapter"], tmp_path / "adapter")
    raw["parts"]["interview"]["adapter"] = str(tmp_path / "adapter")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_service_config(tmp_path / "c.yaml")
    pcfg = cfg.parts["interview"]
    fp = score_fingerprint(
        pcfg, check_adapter(pcfg.adapter).content_hash, base=cfg.model.base, audio=cfg.audio, engine=cfg.engine
    )
    calibration.write(
        calibration.fit("interview", fp, (1.0, 6.0), range(1, 7), [3.0] * 120, [3.2] * 120, [0.4] * 120),
        pcfg.adapter,
    )
    r = run("check", "--config", tmp_path / "c.yaml", timeout=120)
    assert r.returncode == 0 and "intervals: calibrated (mondrian, 90%)" in r.stdout, r.stdout + r.stderr
    for edit, component in (
        (lambda p, a: p.update(task="The candidate describes a photo."), "prompt"),
        (lambda p, a: a.update(vad_threshold=0.7), "audio"),
        (lambda p, a: p.update(aspects={}), None),  # the holistic prompt does not hold the aspects
    ):
        changed = tiny_config()
        changed["parts"] = {"interview": {**raw["parts"]["interview"]}}
        changed.setdefault("audio", {})
        edit(changed["parts"]["interview"], changed["audio"])
        (tmp_path / "e.yaml").write_text(yaml.safe_dump(changed))
        r = run("check", "--config", tmp_path / "e.yaml", timeout=120)
        if component is None:
            assert r.returncode == 0 and "intervals: calibrated" in r.stdout, r.stdout
            continue
        assert r.returncode == 0 and "intervals: stale_calibration" in r.stdout and component in r.stdout, r.stdout
        changed["parts"]["interview"]["interval"] = {"require": True}
        (tmp_path / "e.yaml").write_text(yaml.safe_dump(changed))
        r = run("check", "--config", tmp_path / "e.yaml", timeout=120)
        assert r.returncode == 1 and "NOT SERVABLE" in r.stdout and component in r.stdout, r.stdout


def test_subcommands_of_packages_not_installed_are_left_out(monkeypatch):
    from importlib.metadata import EntryPoint

    import serve.cli.main as cli

    present = EntryPoint("adapters", "adapters.cli:add_commands", cli.COMMANDS_GROUP)
    absent = EntryPoint("gone", "no_such_package.cli:add_commands", cli.COMMANDS_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda group: [absent, present] if group == cli.COMMANDS_GROUP else [])
    commands = {
        name
        for name in ("score", "serve", "serve-config", "make-tiny-model", "train", "loadtest")
        if is_command(cli.build_parser(), name)
    }
    assert {"score", "serve", "serve-config", "make-tiny-model", "train"} <= set(commands)
    assert "loadtest" not in commands


def test_serve_refuses_haproxy_ingress_before_starting_anything(tiny_dir):
    """As Ray sets HAProxy up, the proxy guard's per-client limits would count every client as one: refused."""
    env = {**os.environ, "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    env.pop(ALLOW_HA_PROXY_ENV, None)
    r = l2grader("serve", "--config", tiny_dir / "demo.yaml", "--port", "1", env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    [line] = error_lines(r.stderr)
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in line and f"{ALLOW_HA_PROXY_ENV}=1" in line
    assert "deploying" not in r.stderr  # refused before Ray or the engine started


def test_haproxy_refusal_only_for_haproxy_and_only_unless_allowed():
    assert ha_proxy_refusal({}) is None
    assert ha_proxy_refusal({"RAY_SERVE_ENABLE_HA_PROXY": "0"}) is None
    assert ha_proxy_refusal({"RAY_SERVE_ENABLE_HA_PROXY": "1", ALLOW_HA_PROXY_ENV: "1"}) is None
    assert ha_proxy_refusal({"RAY_SERVE_ENABLE_HA_PROXY": "1", ALLOW_HA_PROXY_ENV: "0"})


@pytest.mark.parametrize(
    ("answers", "duplicates", "says"),
    [(9, 0, "holds 9 of the manifest's 10 answers; run the same command again"), (11, 1, "1 answer(s) appear more")],
)
def test_score_session_says_why_its_output_is_not_whole(monkeypatch, capsys, tiny_dir, answers, duplicates, says):
    """An output missing answers (or repeating one) exits 1 with a line saying so, not with a summary alone."""
    import serve.cli.main as cli
    import serve.engine.requests
    import serve.session.run

    monkeypatch.setattr(serve.engine.requests, "configure_vllm_environment", lambda: None)
    summary = {"answers": answers, "manifest_rows": 10, "duplicates": duplicates}
    monkeypatch.setattr(serve.session.run, "run_session", lambda cfg, parts, opts: summary)
    monkeypatch.setattr(serve.session.run, "print_summary", lambda s: None)
    argv = ["score-session", "--config", str(tiny_dir / "demo.yaml"), "--manifest", "m.csv", "--out", "o", "--verbose"]
    assert cli.main(argv) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert says in line
