"""evaluate's output on answers scored already: agreement in the field's terms, the human-human baseline only where
a second human score is, and the fairness tables of the part and of the overall score, in the JSON, the text and
the HTML report."""

from __future__ import annotations

import json

import numpy as np

from adapters.agreement import METRIC_KEYS
from adapters.evaluate import report_on
from serve.grading.levels import DEFAULT_LEVELS
from tests.test_trust import answer


def run(tmp_path, capsys, second: bool):
    rng = np.random.default_rng(0)
    human = rng.uniform(1, 6, 80).round(1)
    pred = np.clip(human + rng.normal(0, 0.4, 80), 1, 6)
    scored = [answer(float(p), 0.4) for p in pred]
    fields = [
        {"l1": "de" if i % 4 else "fr", **({"human2": float(h + rng.normal(0, 0.3))} if second and i % 2 else {})}
        for i, h in enumerate(human)
    ]
    summary = report_on(
        "interview",
        "made-up",
        scored,
        list(human),
        fields,
        [f"a{i}.wav" for i in range(80)],
        0,
        DEFAULT_LEVELS,
        speakers=[f"s{i // 2}" for i in range(80)],  # two answers per candidate
        plot=tmp_path / "cal.png",
        predictions=None,
        group_by=["l1"],
        report=tmp_path / "r",
        selective_signal="score_sd",
    )
    return summary, capsys.readouterr().out


def test_agreement_fairness_and_no_baseline_without_a_second_score(tmp_path, capsys):
    summary, out = run(tmp_path, capsys, second=False)
    assert tuple(summary["soft"]) == METRIC_KEYS and summary["soft"]["qwk"] > 0.8
    assert summary["human_baseline"] is None and "second human score" not in out
    assert "groups" not in summary
    fair = summary["fairness"]
    part = {(g["field"], g["group"]): g for g in fair["parts"]["interview"]}
    assert part[("all", "all")]["n"] == 80 and part[("all", "all")]["n_candidates"] == 40
    assert part[("l1", "fr")]["n"] == 20 and part[("l1", "fr")]["n_candidates"] == 20
    overall = {(g["field"], g["group"]): g for g in fair["overall"]}
    assert overall[("all", "all")]["n"] == 40  # one overall score per candidate
    assert overall[("l1", "(mixed)")]["n"] == 20  # each candidate's two answers are fr and de
    for g in fair["parts"]["interview"] + fair["overall"]:
        assert g["status"] in ("flagged", "clear", "inconclusive")
    assert "fairness of the overall score" in out and "QWK" in out and "KRC" in out
    cls = summary["classification"]  # Rudner's, at the answer level and per candidate on this part
    assert [c["cut"] for c in cls["cuts"]] == [1.5, 2.5, 3.5, 4.5, 5.5]
    assert cls["answers"]["n"] == 80 and len(cls["answers"]["per_cut"]) == 5
    assert cls["candidates"]["n"] + cls["candidates"]["left_out"] == 40
    for c in cls["answers"]["per_cut"]:
        assert 0.5 <= c["consistency"] <= c["accuracy"] <= 1.0  # consistency p^2 + q^2 never exceeds max(p, q)
    assert "classification of answers (Rudner, n=80)" in out
    page = (tmp_path / "r" / "report.html").read_text()
    assert "Overall score" in page and "QWK (half levels)" in page and "no human-human baseline" in page
    assert json.loads((tmp_path / "r" / "report.json").read_text())["fairness"] == fair


def test_the_human_human_baseline_is_reported_where_a_second_score_is(tmp_path, capsys):
    summary, out = run(tmp_path, capsys, second=True)
    b = summary["human_baseline"]
    assert b["n"] == 40 and set(b) == {"n", "human_human", "machine_human", "drop"}
    assert b["drop"]["pcc"] == b["human_human"]["pcc"] - b["machine_human"]["pcc"]
    assert "second human score on 40 answers" in out
    assert "human-human" in (tmp_path / "r" / "report.html").read_text()
