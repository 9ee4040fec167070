"""Group flags as the standard sets them: the point estimate flags, the interval clears, a small group is
inconclusive."""

from __future__ import annotations

import numpy as np

from adapters.fairness import CLEAR, FLAGGED, INCONCLUSIVE, MIN_ANSWERS, SMD_LIMIT_GROUP, Row, group_table, smd_interval


def test_a_planted_bias_is_flagged_and_handfuls_of_answers_are_inconclusive():
    rng = np.random.default_rng(0)
    rows = []
    # eight voices: one with lenient human raters (+0.8), four of 60 answers without bias, three of 2-5 answers
    sizes = {"biased": 60, "a": 60, "b": 60, "c": 60, "d": 60, "tiny1": 2, "tiny2": 4, "tiny3": 5}
    for voice, n in sizes.items():
        human = rng.uniform(1.5, 5.5, n)
        pred = np.clip(human + rng.normal(0, 0.5, n), 1, 6)
        if voice == "biased":
            human = np.clip(human + 0.8, 1, 6)
        if voice.startswith("tiny"):
            pred = pred + 0.6  # a chance swing in a handful of answers
        rows += [Row(float(p), float(h), False, {"voice": voice}) for p, h in zip(pred, human)]
    table = {g["group"]: g for g in group_table(rows, ["voice"])}
    biased = table["biased"]
    assert biased["status"] == FLAGGED and biased["smd"] < -SMD_LIMIT_GROUP and biased["smd_ci"][1] < 0
    for voice in ("a", "b", "c", "d"):
        g = table[voice]
        assert g["smd_ci"][0] <= g["smd"] <= g["smd_ci"][1] and not g["too_small"]
        assert (g["status"] == FLAGGED) == (abs(g["smd"]) > SMD_LIMIT_GROUP)
    for voice in ("tiny1", "tiny2", "tiny3"):
        g = table[voice]
        assert g["too_small"] and g["smd_ci"] is None and g["status"] == INCONCLUSIVE, g
        assert g["n"] < MIN_ANSWERS and abs(g["smd"]) > SMD_LIMIT_GROUP  # beyond the limit, yet not judged


def test_a_group_whose_point_estimate_is_inside_the_limit_but_whose_interval_straddles_it_is_inconclusive():
    rng = np.random.default_rng(3)
    human = rng.uniform(1.5, 5.5, 12)
    pred = human + rng.normal(0.0, 0.8, 12)
    pred = pred - (pred - human).mean() + 0.05  # a mean error of exactly 0.05
    g = group_table([Row(float(p), float(h), False, {"v": "x"}) for p, h in zip(pred, human)], ["v"])[1]
    assert abs(g["smd"]) < SMD_LIMIT_GROUP and g["smd_ci"][1] - g["smd_ci"][0] > 2 * SMD_LIMIT_GROUP
    assert g["status"] == INCONCLUSIVE  # not flagged, and not cleared either: 12 answers cannot say
    assert CLEAR != g["status"]


def test_bootstrap_interval_is_reproducible_and_undefined_when_constant():
    p, h = [1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 2.5, 4.5]
    assert smd_interval(p, h) == smd_interval(p, h)
    assert smd_interval([3.0] * 5, [3.0] * 5) is None and smd_interval([1.0], [2.0]) is None
