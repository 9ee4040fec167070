"""Evaluation metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from adapters.agreement import METRIC_KEYS, all_metrics, pearson, rmse, spearman, within

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
    assert within(PRED, HUMAN, 1.0) == pytest.approx(1.0)  # the boundary counts as within
    assert within([3.4, 3.6], [3.0, 3.0], 0.5) == pytest.approx(0.5)


def test_all_metrics_keys_and_perfect_agreement():
    m = all_metrics([1.5, 2.5, 6.0], [1.5, 2.5, 6.0])
    assert tuple(m) == METRIC_KEYS
    assert m == pytest.approx({"pcc": 1.0, "spearman": 1.0, "rmse": 0.0, "within_0_5": 1.0, "within_1_0": 1.0})


def test_constant_predictions_have_no_correlation():
    assert math.isnan(pearson([3, 3, 3], [1, 2, 3]))


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError):
        rmse([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        pearson([], [])
