"""Fair-average and cross-entropy losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from adapters.losses import (
    cross_entropy_loss,
    fair_average_loss,
    hard_targets,
    loss_fn,
    soft_targets,
)

SIX = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def rows(t: torch.Tensor) -> list[list[float]]:
    return [[round(float(x), 6) for x in r] for r in t]


def test_soft_targets_split_linearly_between_the_bracketing_levels():
    t = soft_targets(torch.tensor([3.25, 1.5, 5.9]), SIX)
    assert rows(t) == [
        [0, 0, 0.75, 0.25, 0, 0],
        [0.5, 0.5, 0, 0, 0, 0],
        [0, 0, 0, 0, 0.1, 0.9],
    ]


def test_soft_targets_on_a_level_put_all_mass_on_it():
    t = soft_targets(torch.tensor([1.0, 4.0, 6.0]), SIX)
    assert rows(t) == [[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]]


def test_soft_targets_clip_scores_outside_the_scale():
    t = soft_targets(torch.tensor([0.2, 7.5]), SIX)
    assert rows(t) == [[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]]


def test_soft_targets_keep_the_expected_score_and_follow_uneven_levels():
    scores = torch.tensor([1.0, 1.7, 2.5, 3.3, 4.0, 5.49, 6.0])
    t = soft_targets(scores, SIX)
    assert torch.allclose(t.sum(1), torch.ones(len(scores), dtype=t.dtype))
    assert torch.allclose(t @ torch.tensor(SIX, dtype=t.dtype), scores.double())
    # levels 0, 2, 6: 3 lies a quarter of the way from 2 to 6
    assert rows(soft_targets(torch.tensor([3.0]), [0.0, 2.0, 6.0])) == [[0, 0.75, 0.25]]


def test_soft_targets_need_increasing_levels():
    with pytest.raises(ValueError):
        soft_targets(torch.tensor([2.0]), [1.0, 3.0, 2.0])


def test_hard_targets_round_to_the_nearest_level_ties_up():
    idx = hard_targets(torch.tensor([1.0, 1.49, 1.5, 3.25, 3.75, 0.0, 9.0]), SIX)
    assert idx.tolist() == [0, 0, 1, 2, 3, 0, 5]


# Two labels scored 1 and 2, label logits [0, ln 3]: probabilities 0.25 and 0.75.
LOGITS = torch.tensor([[0.0, math.log(3.0)]])
TWO = [1.0, 2.0]


def test_fair_average_loss_by_hand():
    # score 1.5 -> target (0.5, 0.5): -(0.5 ln 0.25 + 0.5 ln 0.75)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert float(fair_average_loss(LOGITS, torch.tensor([1.5]), TWO)) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.836988, abs=1e-6)
    # score 2 -> target (0, 1): -ln 0.75
    assert float(fair_average_loss(LOGITS, torch.tensor([2.0]), TWO)) == pytest.approx(0.287682, abs=1e-6)


def test_cross_entropy_loss_by_hand():
    # 1.5 rounds up to level 2: -ln 0.75; 1.4 rounds to level 1: -ln 0.25
    assert float(cross_entropy_loss(LOGITS, torch.tensor([1.5]), TWO)) == pytest.approx(0.287682, abs=1e-6)
    assert float(cross_entropy_loss(LOGITS, torch.tensor([1.4]), TWO)) == pytest.approx(1.386294, abs=1e-6)


def test_losses_average_over_the_batch():
    logits = torch.cat([LOGITS, LOGITS])
    fa = float(fair_average_loss(logits, torch.tensor([1.5, 2.0]), TWO))
    assert fa == pytest.approx((0.836988 + 0.287682) / 2, abs=1e-6)
    ce = float(cross_entropy_loss(logits, torch.tensor([1.5, 1.4]), TWO))
    assert ce == pytest.approx((0.287682 + 1.386294) / 2, abs=1e-6)


def test_uniform_labels_cost_log_n_whatever_the_score():
    logits = torch.zeros(3, 6)
    for fn in (fair_average_loss, cross_entropy_loss):
        assert float(fn(logits, torch.tensor([1.0, 3.25, 6.0]), SIX)) == pytest.approx(math.log(6), abs=1e-6)


def test_losses_are_renormalised_over_the_label_set_only():
    # shifting every label logit alike leaves the label distribution, hence the loss, unchanged
    scores = torch.tensor([3.25])
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5, 0.0, -0.2]])
    for fn in (fair_average_loss, cross_entropy_loss):
        assert float(fn(logits + 7.0, scores, SIX)) == pytest.approx(float(fn(logits, scores, SIX)), abs=1e-6)


def test_fair_average_gradient_is_probabilities_minus_targets():
    logits = torch.zeros(1, 2, requires_grad=True)
    fair_average_loss(logits, torch.tensor([1.25]), TWO).backward()
    assert logits.grad[0].tolist() == pytest.approx([0.5 - 0.75, 0.5 - 0.25], abs=1e-6)


def test_loss_fn_names():
    assert loss_fn("fa") is fair_average_loss
    assert loss_fn("ce") is cross_entropy_loss
    with pytest.raises(ValueError):
        loss_fn("mse")
