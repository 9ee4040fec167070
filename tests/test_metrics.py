"""Evaluation metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from adapters.agreement import (
    METRIC_KEYS,
    all_metrics,
    half_level_index,
    human_baseline,
    kendall,
    level_agreement,
    level_index,
    pearson,
    qwk,
    rmse,
    spearman,
    within,
)

PRED = [1.0, 2.0, 3.0, 4.0]
HUMAN = [2.0, 2.0, 4.0, 5.0]


def test_pearson_by_hand():
    # deviations (-1.5, -0.5, 0.5, 1.5) and (-1.25, -1.25, 0.75, 1.75): 5.5 / sqrt(5 * 6.75)
    assert pearson(PRED, HUMAN) == pytest.approx(5.5 / math.sqrt(33.75), abs=1e-12)
    assert pearson(PRED, HUMAN) == pytest.approx(0.946729, abs=1e-6)
    assert pearson([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)


def test_spearman_uses_average_ranks_for_ties():
    # ranks (1, 2, 3, 4) and (1.5, 1.5, 3, 4): 4.5 / sqrt(5 * 4.5)
    assert spearman(PRED, HUMAN) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    # monotone but not linear: rank correlation 1
    assert spearman([1, 2, 3, 10], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0)


def test_rmse_and_within_by_hand():
    # errors (-1, 0, -1, -1)
    assert rmse(PRED, HUMAN) == pytest.approx(math.sqrt(0.75))
    assert within(PRED, HUMAN, 0.5) == pytest.approx(0.25)
    assert within(PRED, HUMAN, 1.0) == pytest.approx(0.25)  # strictly less than (LESS1): 1.0 off is not within
    assert within([3.4, 3.6, 3.5], [3.0, 3.0, 3.0], 0.5) == pytest.approx(1 / 3)  # LESS05: 0.5 off is not within


def test_all_metrics_keys_and_perfect_agreement():
    m = all_metrics([1.5, 2.5, 6.0], [1.5, 2.5, 6.0])
    assert tuple(m) == METRIC_KEYS
    assert m == pytest.approx(
        {
            "pcc": 1.0,
            "spearman": 1.0,
            "kendall": 1.0,
            "rmse": 0.0,
            "within_0_5": 1.0,
            "within_1_0": 1.0,
            "qwk": 1.0,
            "qwk_half": 1.0,
            "exact": 1.0,
            "adjacent": 1.0,
        }
    )


def test_constant_predictions_have_no_correlation():
    assert math.isnan(pearson([3, 3, 3], [1, 2, 3]))


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError):
        rmse([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        pearson([], [])


def test_kendall_by_hand():
    # pairs of PRED/HUMAN: 5 concordant, 0 discordant, 1 tied in HUMAN only: 5 / sqrt(6 * 5)
    assert kendall(PRED, HUMAN) == pytest.approx(5 / math.sqrt(30), abs=1e-12)
    assert math.isnan(kendall([3, 3, 3], [1, 2, 3]))


def test_levels_and_half_levels():
    assert level_index([0.2, 1.4, 1.5, 3.49, 6.7]).tolist() == [0, 0, 1, 2, 5]  # halfway rounds up
    assert half_level_index([1.24, 1.25, 1.74, 5.9]).tolist() == [0, 1, 1, 10]  # 1.0, 1.5, 1.5, 6.0


def test_qwk_and_level_agreement_by_hand():
    # levels: machine (0, 1, 2, 3), human (1, 1, 3, 4). Observed squared disagreements 1 + 0 + 1 + 1 = 3; expected
    # under independence: the mean over all 16 (machine, human) pairs of (i - j)^2 times 4 = 56 / 4 = 14.
    # QWK = 1 - 3 / 14; the weights' common factor (6 - 1)^2 cancels.
    m = level_agreement(PRED, HUMAN)
    assert m["qwk"] == pytest.approx(1 - 3 / 14, abs=1e-12)
    assert qwk([0, 1, 2, 3], [1, 1, 3, 4], 6) == pytest.approx(11 / 14)
    assert m["exact"] == pytest.approx(0.25) and m["adjacent"] == pytest.approx(1.0)
    # half levels: 2.5 against 3.0 is one half level apart, not a whole level
    h = level_agreement([2.5, 4.0], [3.0, 4.0])
    assert h["exact"] == pytest.approx(1.0)  # 2.5 rounds up to level 3
    assert h["qwk_half"] < 1.0 and h["qwk"] == pytest.approx(1.0)
    assert qwk([0, 1, 2], [2, 1, 0], 3) == pytest.approx(-1.0)  # reversed ratings
    assert math.isnan(qwk([2, 2], [2, 2], 6))  # one category only: undefined


def test_human_baseline_only_with_a_second_score():
    assert human_baseline(PRED, HUMAN, [None] * 4) is None
    assert human_baseline(PRED, HUMAN, [None, None, None, 5.0]) is None  # one answer is not a baseline
    b = human_baseline(PRED, HUMAN, [2.0, None, 4.0, 4.0])
    assert b["n"] == 3 and set(b) == {"n", "human_human", "machine_human", "drop"}
    assert tuple(b["human_human"]) == METRIC_KEYS
    # on answers 1, 3, 4: human 2 (2, 4, 4) against human 1 (2, 4, 5): errors 0, 0, -1
    assert b["human_human"]["rmse"] == pytest.approx(math.sqrt(1 / 3))
    assert b["machine_human"]["rmse"] == pytest.approx(1.0)  # machine (1, 3, 4): every answer 1 off
    assert b["drop"]["rmse"] == pytest.approx(1.0 - math.sqrt(1 / 3))  # positive: the machine is worse
    assert b["drop"]["exact"] == pytest.approx(2 / 3 - 0.0)
