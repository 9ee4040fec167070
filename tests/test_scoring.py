import numpy as np
import pytest

from serve.grading.levels import DEFAULT_LEVELS, nearest_level
from serve.grading.results import ModelInfo
from serve.grading.scoring import ChunkScore, aggregate, label_probabilities, soft_score

MODEL = ModelInfo(base="m", adapter=None, adapter_hash=None)


def test_label_probabilities_renormalise():
    p = label_probabilities(np.log([0.1, 0.2, 0.1]))  # mass 0.4 on the labels
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
