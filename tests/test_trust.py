"""Selective scoring, fairness statistics and the HTML report, on answers made up with known properties."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adapters.fairness import FLAGGED, SMD_LIMIT_GROUP, Row, fairness_report, group_table, smd
from adapters.report import write_report
from adapters.trust import error_spearman, selective, trust_report
from serve.grading.levels import DEFAULT_LEVELS
from serve.grading.results import ModelInfo, Quality, Review, ScoredAnswer, Uncertainty

MODEL = ModelInfo(base="m", adapter=None, adapter_hash=None)


def answer(score: float, sd: float, mass: float = 0.9, snr: float = 40.0) -> ScoredAnswer:
    reasons = ["uncertain"] if sd > 1.0 else []
    return ScoredAnswer(
        part="p",
        score=score,
        hard_score=float(round(score)),
        cefr="B1",
        probabilities={},
        label_cefr={lv.label: lv.cefr for lv in DEFAULT_LEVELS},
        label_mass=mass,
        uncertainty=Uncertainty(score_sd=sd, entropy=sd / 2, label_mass=mass, chunk_spread=0.0),
        quality=Quality(speech_s=3, speech_ratio=0.6, snr_db=snr, clipped_fraction=0, speech_dbfs=-20),
        review=Review(needed=bool(reasons), reasons=reasons),
        chunks=[],
        duration_s=4,
        model=MODEL,
    )


def made_up(n=200, seed=0):
    """Human scores; predictions whose error grows with the score SD; a quarter of answers far off and unsure."""
    rng = np.random.default_rng(seed)
    human = rng.uniform(1, 6, n)
    sd = np.where(np.arange(n) % 4 == 0, 1.5, 0.4)
    pred = np.clip(human + rng.normal(scale=np.where(sd > 1, 1.5, 0.2)), 1, 6)
    return human, pred, sd


def test_routing_the_most_doubtful_raises_the_agreement_of_the_rest():
    human, pred, sd = made_up()
    rows = selective(pred, human, sd)
    assert [r["review_rate"] for r in rows] == [0, 0.05, 0.10, 0.20, 0.30]
    assert [r["n_kept"] for r in rows] == [200, 190, 180, 160, 140]
    pccs = [r["pcc"] for r in rows]
    assert pccs == sorted(pccs) and pccs[3] > pccs[0] + 0.05
    assert rows[4]["rmse"] < rows[0]["rmse"]
    assert error_spearman(pred, human, sd) > 0.3
    assert error_spearman(pred, human, -sd) < -0.3  # a signal the wrong way round shows as negative
    # a signal that knows nothing does not help
    noise = np.random.default_rng(5).random(200)
    assert abs(error_spearman(pred, human, noise)) < 0.2


def test_smd_and_the_group_table_flag_a_planted_bias():
    human, pred, _ = made_up(400, seed=1)
    pred = np.clip(human + np.random.default_rng(2).normal(scale=0.3, size=400), 1, 6)
    groups = np.array(["a", "b"])[np.arange(400) % 2]
    biased = human.copy()
    biased[groups == "b"] = np.clip(biased[groups == "b"] + 0.8, 1, 6)  # b's human raters were lenient
    assert smd(pred, human) == pytest.approx(0.0, abs=0.05)
    table = group_table([Row(p, h, False, {"voice": g}) for p, h, g in zip(pred, biased, groups)], ["voice"])
    by = {(t["field"], t["group"]): t for t in table}
    assert by[("voice", "b")]["status"] == FLAGGED and by[("voice", "b")]["smd"] < -SMD_LIMIT_GROUP
    assert by[("voice", "b")]["mean_error"] == pytest.approx(-0.7, abs=0.15)
    assert by[("voice", "a")]["status"] != FLAGGED and by[("voice", "a")]["n"] == 200
    assert by[("all", "all")]["n"] == 400 and by[("all", "all")]["smd_limit"] == 0.15
    missing = group_table([Row(1.0, 1.0, True, {}), Row(2.0, 2.5, False, {"l1": None})], ["l1"])
    assert missing[1]["group"] == "(none)" and missing[1]["review_rate"] == 0.5


def test_trust_report_and_html(tmp_path):
    human, pred, sd = made_up(60)
    scored = [answer(p, s) for p, s in zip(pred, sd)]
    fields = [{"voice": "v1" if i % 3 else "v2"} for i in range(60)]
    rep = trust_report(scored, list(human))
    assert [set(r) for r in rep["selective"]] == [{"review_rate", "pcc", "rmse", "within_0_5", "n_kept"}] * 5
    assert rep["review_verdict"]["review_rate"] == pytest.approx(0.25)
    assert rep["review_verdict"]["pcc"] > rep["selective"][0]["pcc"]
    assert rep["review_verdict"]["reasons"] == {"uncertain": 15}
    fairness = fairness_report(
        [Row(a.score, h, a.review.needed, f, part="p") for a, h, f in zip(scored, human, fields)], ["voice"]
    )
    assert {g["group"] for g in fairness["parts"]["p"]} == {"all", "v1", "v2"}
    with pytest.raises(ValueError, match="unknown signal"):
        trust_report(scored, list(human), primary="nope")

    summary = {
        "soft": {"pcc": 0.9, "spearman": 0.9, "rmse": 0.5, "within_0_5": 0.6, "within_1_0": 0.9},
        "hard": {"pcc": 0.8, "spearman": 0.8, "rmse": 0.6, "within_0_5": 0.5, "within_1_0": 0.8},
        "answers": 60,
        "not_scorable": 2,
        **rep,
        "fairness": fairness,
    }
    page = write_report(
        tmp_path / "r", summary, list(human), scored, [lv.score for lv in DEFAULT_LEVELS], title="t <x>"
    )
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3 and "t &lt;x&gt;" in text
    assert "Williamson" in text and "v2" in text and 'src="http' not in text
    assert 'class="untrained"' not in text
    marked = write_report(tmp_path / "u", {**summary, "untrained": True}, list(human), scored, [1, 2], title="t")
    assert '<p class="untrained"' in marked.read_text()
    assert json.loads((tmp_path / "r" / "report.json").read_text())["fairness"] == fairness
    assert "inconclusive" in text and "Overall score" in text and "no human-human baseline" in text
