import numpy as np
import pytest

from serve.grading.levels import DEFAULT_LEVELS, nearest_level
from serve.grading.results import ModelInfo
from serve.grading.scoring import ChunkScore, aggregate, label_distribution, soft_score

MODEL = ModelInfo(base="m", adapter=None, adapter_hash=None)


def test_label_probabilities_renormalise():
    p = label_distribution(np.log([0.1, 0.2, 0.1]))[0]  # mass 0.4 on the labels
    assert p == pytest.approx([0.25, 0.5, 0.25])


def test_soft_score_is_expected_score():
    p = np.array([0, 0, 0.5, 0.5, 0, 0])
    assert soft_score(DEFAULT_LEVELS, p) == pytest.approx(3.5)


def test_aggregate_weights_chunks_by_duration():
    one_hot = np.eye(6)
    chunks = [ChunkScore(0, 30, one_hot[1]), ChunkScore(30, 40, one_hot[5])]  # 30 s at 2.0, 10 s at 6.0
    ans = aggregate("p", DEFAULT_LEVELS, chunks, MODEL)
    assert ans.score == pytest.approx((30 * 2 + 10 * 6) / 40)
    assert ans.hard_score == 2.0
    assert ans.cefr == "B1"  # 3.0
    assert sum(ans.probabilities.values()) == pytest.approx(1.0)
    assert [c.score for c in ans.chunks] == [2.0, 6.0]
    assert ans.duration_s == 40


def test_nearest_level_ties_go_up():
    assert nearest_level(DEFAULT_LEVELS, 3.5).cefr == "B2"
    assert nearest_level(DEFAULT_LEVELS, 3.49).cefr == "B1"
    assert nearest_level(DEFAULT_LEVELS, -3).cefr == "A1"


def test_label_distribution_keeps_the_label_mass():
    p, mass = label_distribution(np.log([0.1, 0.2, 0.1]))
    assert p == pytest.approx([0.25, 0.5, 0.25])
    assert mass == pytest.approx(0.4)
    assert label_distribution([0.0, -np.inf])[1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        label_distribution([-np.inf, -np.inf])


def test_uncertainty_of_an_answer():
    one_hot = np.eye(6)
    sure = aggregate("p", DEFAULT_LEVELS, [ChunkScore(0, 10, one_hot[2], 0.9)], MODEL)
    assert sure.uncertainty.score_sd == pytest.approx(0.0)
    assert sure.uncertainty.entropy == pytest.approx(0.0)
    assert sure.uncertainty.chunk_spread == 0.0
    assert sure.label_mass == sure.uncertainty.label_mass == pytest.approx(0.9)
    assert sure.chunks[0].label_mass == pytest.approx(0.9)

    uniform = aggregate("p", DEFAULT_LEVELS, [ChunkScore(0, 10, np.full(6, 1 / 6))], MODEL)
    assert uniform.uncertainty.entropy == pytest.approx(1.0)
    assert uniform.uncertainty.score_sd == pytest.approx(np.std([1, 2, 3, 4, 5, 6]))

    # two chunks that disagree: the mixture is split between levels 2 and 6, weighted 3:1 by duration
    split = aggregate(
        "p", DEFAULT_LEVELS, [ChunkScore(0, 30, one_hot[1], 0.8), ChunkScore(30, 40, one_hot[5], 0.4)], MODEL
    )
    assert split.uncertainty.chunk_spread == pytest.approx(4.0)
    assert split.uncertainty.score_sd == pytest.approx(np.sqrt(0.75 * 0.25) * 4)
    assert split.label_mass == pytest.approx((30 * 0.8 + 10 * 0.4) / 40)
