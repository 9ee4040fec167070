"""The candidate's result by the exam's stated rule (no engine): unscorable and missing parts follow the rule,
weights and cut scores change the result, the overall interval covers as it states, and Rudner's classification
accuracy and consistency against a case computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serve.grading.answers import candidate_result, failure, refusal
from serve.grading.audio import AudioError
from serve.grading.classification import default_cuts, level_at, rudner, sd_of_interval
from serve.grading.config import CandidateConfig, GraderConfig
from serve.grading.levels import DEFAULT_LEVELS, nearest_level
from serve.grading.results import ModelInfo, ScoredAnswer, ScoreInterval, Uncertainty

LEVELS = {"interview": DEFAULT_LEVELS, "long_turn": DEFAULT_LEVELS, "read_aloud": DEFAULT_LEVELS}


def scored(part: str, score: float, half_width: float | None = 0.5, coverage: float = 0.9) -> ScoredAnswer:
    interval = None
    if half_width is not None:
        low, high = score - half_width, score + half_width
        interval = ScoreInterval(
            low=low, high=high, width=high - low, coverage=coverage, method="absolute", calibrated_on=500
        )
    return ScoredAnswer(
        part=part,
        score=score,
        hard_score=round(score),
        cefr=nearest_level(DEFAULT_LEVELS, score).cefr,
        probabilities={},
        label_cefr={},
        label_mass=1.0,
        uncertainty=Uncertainty(score_sd=0.3, entropy=0.5, label_mass=1.0, chunk_spread=0.0),
        interval=interval,
        interval_status="calibrated" if interval else "uncalibrated",
        chunks=[],
        duration_s=20.0,
        model=ModelInfo(base="tiny", adapter=None, adapter_hash=None),
    )


def silent(part: str):
    return refusal(part, AudioError("silence", "the audio is silent"), "s")


def rule(**kw) -> CandidateConfig:
    return CandidateConfig.model_validate(kw)


EXAM = {"interview": {"weight": 1}, "long_turn": {"weight": 2}}


def test_parts_are_averaged_then_weighted():
    answers = [scored("interview", 2.0), scored("interview", 4.0), scored("long_turn", 5.0)]
    equal = candidate_result(answers, LEVELS)  # no rule: every part answered, equal weights
    assert equal.score == pytest.approx((3.0 + 5.0) / 2)  # not the mean of the three answers (11/3)
    assert equal.by_part["interview"].score == 3.0 and equal.by_part["interview"].weight == 0.5
    weighted = candidate_result(answers, LEVELS, rule(parts=EXAM))
    assert weighted.score == pytest.approx((3.0 + 2 * 5.0) / 3)
    assert weighted.by_part["long_turn"].weight == pytest.approx(2 / 3)
    assert "long_turn 0.667" in weighted.rule
    assert not weighted.withheld and weighted.withheld_reasons == []


def test_an_unscorable_part_follows_the_rule():
    answers = [scored("interview", 4.0), silent("long_turn")]
    withheld = candidate_result(answers, LEVELS, rule(parts=EXAM))  # the default: withhold
    assert (withheld.score, withheld.cefr, withheld.withheld, withheld.interval) == (None, None, True, None)
    assert [(w.kind, w.part) for w in withheld.withheld_reasons] == [("not_scorable", "long_turn")]
    assert withheld.interval_status == "withheld" and "not_scorable" in withheld.review.reasons
    counted = candidate_result(answers, LEVELS, rule(parts=EXAM, unscorable={"count_as": 1.0}))
    assert counted.score == pytest.approx((4.0 + 2 * 1.0) / 3) and not counted.withheld  # silence does not help
    assert counted.by_part["long_turn"].counted_as == 1 and counted.cefr == "A2"
    # a part's own rule wins over the exam's
    own = rule(parts={"interview": {}, "long_turn": {"weight": 2, "unscorable": {"count_as": 0.0}}})
    assert candidate_result(answers, LEVELS, own).score == pytest.approx(4.0 / 3)
    # one silent answer of a part with several: it counts as the stated score within the part's mean
    three = [scored("interview", 4.0), silent("interview"), scored("long_turn", 3.0)]
    got = candidate_result(three, LEVELS, rule(unscorable={"count_as": 1.0}))
    assert got.by_part["interview"].score == pytest.approx(2.5) and got.score == pytest.approx(2.75)


def test_a_missing_required_part_follows_the_rule():
    answers = [scored("interview", 4.0)]
    withheld = candidate_result(answers, LEVELS, rule(parts=EXAM))
    assert withheld.withheld and [(w.kind, w.part) for w in withheld.withheld_reasons] == [
        ("missing_part", "long_turn")
    ]
    assert "missing_part" in withheld.review.reasons
    counted = candidate_result(answers, LEVELS, rule(parts=EXAM, missing={"count_as": 1.0}))
    assert counted.score == pytest.approx(2.0) and counted.by_part["long_turn"].answers == 0
    optional = {"interview": {"weight": 1}, "long_turn": {"weight": 2, "required": False}}
    skipped = candidate_result(answers, LEVELS, rule(parts=optional))
    assert skipped.score == 4.0 and "long_turn" not in skipped.by_part  # an optional part left out: not counted
    assert candidate_result([silent("long_turn")], LEVELS, rule(parts=optional)).withheld_reasons[0].kind == (
        "missing_part"
    )
    # a part not in the exam is shown with weight 0 and does not count
    extra = candidate_result([*answers, scored("long_turn", 2.0), scored("read_aloud", 1.0)], LEVELS, rule(parts=EXAM))
    assert extra.by_part["read_aloud"].weight == 0 and extra.score == pytest.approx((4.0 + 4.0) / 3)


def test_a_failed_answer_withholds_whatever_the_rule():
    answers = [scored("interview", 4.0), failure("long_turn", "engine_error", "the engine failed")]
    got = candidate_result(answers, LEVELS, rule(unscorable={"count_as": 1.0}, missing={"count_as": 1.0}))
    assert got.withheld and got.withheld_reasons[0].kind == "incomplete" and not got.complete


def test_the_cut_score_table_sets_the_level_at_the_boundaries():
    cuts = default_cuts(DEFAULT_LEVELS)
    assert cuts == [("A2", 1.5), ("B1", 2.5), ("B2", 3.5), ("C1", 4.5), ("C2", 5.5)]
    for s in np.arange(1.0, 6.01, 0.25):  # the default is the nearest level (ties to the higher), as before
        assert level_at(float(s), "A1", cuts) == nearest_level(DEFAULT_LEVELS, float(s)).cefr
    table = [{"cefr": c, "min_score": x} for c, x in [("A2", 1.5), ("B1", 2.7), ("B2", 3.5), ("C1", 4.5), ("C2", 5.5)]]
    for score, default, stricter in [(2.5, "B1", "A2"), (2.69, "B1", "A2"), (2.7, "B1", "B1"), (2.49, "A2", "A2")]:
        answers = [scored("interview", score)]
        assert candidate_result(answers, LEVELS).cefr == default
        assert candidate_result(answers, LEVELS, rule(cuts=table)).cefr == stricter
    with pytest.raises(ValueError, match="ascending"):
        rule(cuts=[{"cefr": "B1", "min_score": 3.0}, {"cefr": "A2", "min_score": 2.0}])


def test_a_config_states_the_rule_and_configs_without_it_still_load():
    base = {"model": {"base": "tiny"}, "parts": {"interview": {}, "long_turn": {}}}
    assert GraderConfig.model_validate(base).candidate == CandidateConfig()
    cfg = GraderConfig.model_validate(
        {
            **base,
            "candidate": {"parts": {"long_turn": {"weight": 2, "missing": {"count_as": 1}}}, "unscorable": "withhold"},
        }
    )
    assert cfg.candidate.missing_rule("long_turn").count_as == 1 and cfg.candidate.missing_rule("x") == "withhold"
    with pytest.raises(ValueError, match=r"must be 'withhold' or \{count_as: <score>\}, got 'drop'"):
        GraderConfig.model_validate({**base, "candidate": {"unscorable": "drop"}})  # no silent drop


def test_the_overall_interval_is_the_weighted_sum_of_the_parts_bounds():
    answers = [scored("interview", 2.0, 0.4), scored("interview", 4.0, 0.6), scored("long_turn", 5.0, 1.0)]
    got = candidate_result(answers, LEVELS, rule(parts=EXAM))
    i = got.interval
    assert (i.low, i.high) == pytest.approx(((2.5 + 2 * 4.0) / 3, (3.5 + 2 * 6.0) / 3))
    assert i.coverage == pytest.approx(1 - 3 * 0.1) and i.answers == 3 and got.interval_status == "union_bound"
    no_interval = candidate_result([scored("interview", 3.0), scored("long_turn", 3.0, None)], LEVELS)
    assert no_interval.interval is None and no_interval.interval_status == "uncalibrated"
    strict = candidate_result(answers, LEVELS, rule(parts=EXAM, interval_coverage=0.8))
    assert strict.interval is None and strict.interval_status == "below_coverage"


def test_the_overall_interval_covers_at_least_its_stated_coverage():
    """Simulated candidates: three parts (two answers to the interview), human scores, model scores with noise,
    each answer's 90 % interval from the noise's quantile. The overall interval must hold the human overall score
    (the same rule on the human scores) at least as often as it states, on either side."""
    rng = np.random.default_rng(7)
    n, alpha, sd = 4000, 0.1, 0.5
    half = sd * 1.6448536269514722  # the 90 % central interval of the noise
    exam = rule(parts={"interview": {"weight": 2}, "long_turn": {"weight": 1}, "read_aloud": {"weight": 1}})
    w = {"interview": 0.5, "long_turn": 0.25, "read_aloud": 0.25}
    below = above = 0
    coverage = None
    for _ in range(n):
        ability = rng.uniform(1.5, 5.5)
        human = {p: ability + rng.normal(0, 0.4, k) for p, k in [("interview", 2), ("long_turn", 1), ("read_aloud", 1)]}
        answers = [scored(p, float(h + rng.normal(0, sd)), half, 1 - alpha) for p, hs in human.items() for h in hs]
        got = candidate_result(answers, LEVELS, exam)
        truth = sum(w[p] * float(np.mean(hs)) for p, hs in human.items())
        below += truth < got.interval.low
        above += truth > got.interval.high
        coverage = got.interval.coverage
    assert coverage == pytest.approx(1 - 4 * alpha)  # four answers: a guaranteed 60 %
    realised = 1 - (below + above) / n
    se = math.sqrt(coverage * (1 - coverage) / n)
    print(f"n={n}: nominal {coverage:.3f}, realised {realised:.3f} (below {below / n:.4f}, above {above / n:.4f})")
    assert realised >= coverage - 3 * se
    for side in (below, above):  # each side misses at most its share of the nominal miscoverage
        assert side / n <= (1 - coverage) / 2 + 3 * se


def test_rudner_accuracy_and_consistency_against_a_hand_computed_case():
    # Two candidates, one cut at 2.5, sd 0.5: at 3.0 (z = 1) and 2.0 (z = -1).
    phi1 = 0.8413447460685429  # Phi(1)
    got = rudner([3.0, 2.0], [0.5, 0.5], [("B1", 2.5)])
    (cut,) = got["per_cut"]
    assert cut["accuracy"] == pytest.approx(phi1)  # each on the observed side with Phi(1)
    assert cut["consistency"] == pytest.approx(phi1**2 + (1 - phi1) ** 2)  # 0.7330
    assert cut["near"] == 2 and got["n"] == 2
    assert got["accuracy"] == pytest.approx(phi1) and got["consistency"] == pytest.approx(cut["consistency"])
    # Two cuts (2.5, 3.5), one candidate at 3.0 with sd 0.5: in B1 with Phi(1) - Phi(-1) = 0.6827
    two = rudner([3.0], [0.5], [("B1", 2.5), ("B2", 3.5)])
    p_mid = 2 * phi1 - 1
    assert two["accuracy"] == pytest.approx(p_mid)
    assert two["consistency"] == pytest.approx(p_mid**2 + 2 * (1 - phi1) ** 2)
    assert [c["accuracy"] for c in two["per_cut"]] == pytest.approx([phi1, phi1])
    # sd from an interval: a 90 % interval of width 2 * 1.645 is sd 1
    assert sd_of_interval(0.0, 2 * 1.6448536269514722, 0.9) == pytest.approx(1.0)
    # no uncertainty: always accurate and consistent
    assert rudner([3.0], [0.0], [("B1", 2.5)])["accuracy"] == 1.0


def test_a_sessions_candidates_table_holds_the_result_as_the_batch_gives_it():
    import pyarrow as pa

    from serve.session.schema import CANDIDATES_SCHEMA

    for answers in (
        [scored("interview", 3.0), scored("long_turn", 4.0)],
        [scored("interview", 3.0), silent("long_turn")],
    ):
        got = candidate_result(answers, LEVELS, rule(parts=EXAM))
        row = {"candidate_id": "c", "answers": 2, "parts": ["interview"], **got.model_dump()}
        (back,) = pa.Table.from_pylist([row], schema=CANDIDATES_SCHEMA).to_pylist()
        back["by_part"], back["aspects"] = dict(back["by_part"]), dict(back["aspects"])  # maps read back as pairs
        assert {k: back[k] for k in got.model_dump()} == got.model_dump()
