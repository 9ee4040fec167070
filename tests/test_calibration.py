"""Calibrated score intervals: split conformal coverage, the file beside the adapter, the answer's fields."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serve.grading import calibration
from serve.grading.calibration import CALIBRATION_FILE, Intervals, coverage_table, fit, load
from serve.grading.config import ReviewConfig
from serve.grading.levels import DEFAULT_LEVELS
from serve.grading.results import INTERVAL_STATUSES, ModelInfo
from serve.grading.review import assess
from serve.grading.scoring import ChunkScore, aggregate
from tests.test_review import CLEAN

SCALE = (1.0, 6.0)


def heteroscedastic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(human, score, score_sd): errors whose size grows with the model's score_sd, as a useful sd does."""
    rng = np.random.default_rng(seed)
    human = rng.uniform(1.5, 5.5, n)
    sd = rng.uniform(0.1, 1.2, n)
    score = human + rng.normal(0, 0.7 * sd)
    return human, score, sd


def test_held_out_coverage_is_nominal_and_scaled_intervals_are_narrower():
    cal = fit("p", "h", SCALE, *heteroscedastic(1000, 0))
    table = coverage_table(cal, *heteroscedastic(4000, 1))
    assert {(r["method"], r["nominal"]) for r in table} == {
        (m, c) for m in ("absolute", "scaled") for c in (0.8, 0.9, 0.95)
    }
    for r in table:
        assert r["n"] == 4000
        assert r["nominal"] - 0.03 <= r["coverage"] <= r["nominal"] + 0.04, r
    width = {(r["method"], r["nominal"]): r["mean_width"] for r in table}
    for c in (0.8, 0.9, 0.95):
        assert width[("scaled", c)] < width[("absolute", c)]
        assert width[("absolute", 0.8)] <= width[("absolute", c)]


def test_quantile_is_the_conformal_order_statistic_and_too_few_answers_give_the_whole_scale():
    cal = fit("p", "h", SCALE, [3.0] * 9, [3.0 + 0.1 * i for i in range(9)], [1.0] * 9)
    # n = 9: coverage 0.8 -> ceil(10 * 0.8) = 8th smallest |error|
    assert cal.quantile("absolute", 0.8) == pytest.approx(0.7)
    assert cal.quantile("absolute", 0.95) == float("inf")  # ceil(10 * 0.95) = 10 > 9
    iv = cal.interval("absolute", 0.95, 3.0, 0.5)
    assert (iv.low, iv.high, iv.width) == (1.0, 6.0, 5.0)
    iv = cal.interval("absolute", 0.8, 5.8, 0.5)  # clipped to the scale
    assert iv.low == pytest.approx(5.1) and iv.high == 6.0 and iv.calibrated_on == 9 and iv.coverage == 0.8


def test_scaled_interval_grows_with_score_sd_with_a_floor():
    cal = fit("p", "h", SCALE, *heteroscedastic(200, 2))
    sure, unsure = cal.interval("scaled", 0.9, 3.5, 0.0), cal.interval("scaled", 0.9, 3.5, 1.0)
    assert 0 < sure.width < unsure.width
    assert sure.width == pytest.approx(cal.interval("scaled", 0.9, 3.5, calibration.SD_FLOOR).width)


def _write(tmp_path, cal) -> None:
    calibration.write(cal, tmp_path)


def test_load_ties_the_calibration_to_the_adapter_hash(tmp_path):
    assert load(None, None).status == "uncalibrated"
    assert load(tmp_path, "abc").status == "uncalibrated"
    _write(tmp_path, fit("p", "abc", SCALE, *heteroscedastic(50, 3)))
    ok = load(tmp_path, "abc")
    assert ok.status == "calibrated" and ok.calibration.n == 50
    stale = load(tmp_path, "def")
    assert stale.status == "stale_calibration" and stale.calibration is None and "abc" in stale.detail
    for bad in (b"{", b"[]", json.dumps({"part": "p"}).encode(), b'{"residuals": {"absolute": [-1]}}'):
        (tmp_path / CALIBRATION_FILE).write_bytes(bad)
        state = load(tmp_path, "abc")
        assert state.status == "invalid_calibration" and state.calibration is None
    raw = json.loads(fit("p", "abc", SCALE, [3.0], [3.0], [1.0]).model_dump_json())
    for broken in (
        {"residuals": {**raw["residuals"], "scaled": [float("nan")]}},
        {"residuals": {"absolute": raw["residuals"]["absolute"]}},
        {"scale": [6.0, 1.0]},
        {"sd_floor": 0.0},
        {"format": 99},
    ):
        (tmp_path / CALIBRATION_FILE).write_text(json.dumps({**raw, **broken}))
        assert load(tmp_path, "abc").status == "invalid_calibration", broken
    assert {s.status for s in (ok, stale)} <= set(INTERVAL_STATUSES)


MODEL = ModelInfo(base="b", adapter="p@abc", adapter_hash="abc")


def test_every_answer_carries_its_interval_or_says_why_not():
    probs = np.array([0.0, 0.1, 0.6, 0.3, 0.0, 0.0])
    chunks = [ChunkScore(0, 10, probs)]
    plain = aggregate("p", DEFAULT_LEVELS, chunks, MODEL)
    assert plain.interval is None and plain.interval_status == "uncalibrated"
    state = calibration.CalibrationState(fit("p", "abc", SCALE, *heteroscedastic(300, 4)), "calibrated")
    ans = aggregate("p", DEFAULT_LEVELS, chunks, MODEL, Intervals(state, 0.9, "scaled"))
    assert ans.interval_status == "calibrated" and ans.interval.coverage == 0.9 and ans.interval.method == "scaled"
    assert ans.interval.low < ans.score < ans.interval.high
    stale = aggregate(
        "p", DEFAULT_LEVELS, chunks, MODEL, Intervals(calibration.CalibrationState(None, "stale_calibration"))
    )
    assert stale.interval is None and stale.interval_status == "stale_calibration"
    # the review reason for an interval wider than the part allows
    narrow = assess(ans, CLEAN, ReviewConfig(max_interval_width=ans.interval.width + 0.01))
    wide = assess(ans, CLEAN, ReviewConfig(max_interval_width=ans.interval.width - 0.01))
    assert "wide_interval" not in narrow.review.reasons and "wide_interval" in wide.review.reasons
    assert "wide_interval" not in assess(plain, CLEAN, ReviewConfig(max_interval_width=0.0)).review.reasons
    # the fields travel in the answer's JSON
    again = type(ans).model_validate_json(wide.model_dump_json())
    assert again.interval == ans.interval and again.review.reasons == wide.review.reasons


def test_duration_and_cut_off_reasons():
    ans = aggregate("p", DEFAULT_LEVELS, [ChunkScore(0, 4.0, np.full(6, 1 / 6))], MODEL)
    t = ReviewConfig(min_duration_s=5.0, max_duration_s=None, max_score_sd=None)
    assert assess(ans, CLEAN, t).review.reasons == ["too_short"]
    assert assess(ans, CLEAN, t.model_copy(update={"min_duration_s": 1.0, "max_duration_s": 3.0})).review.reasons == [
        "too_long"
    ]
    cut = CLEAN.model_copy(update={"ends_in_speech": True})
    assert assess(ans, cut, t.model_copy(update={"min_duration_s": None})).review.reasons == ["cut_off"]
    assert assess(ans, cut, t.model_copy(update={"min_duration_s": None, "cut_off": False})).review.reasons == []
