"""The one answer pipeline (no engine): the complete answer, the candidate's result, and the bulk output's schema
derived from the same models as the HTTP answer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import BaseModel

from serve.grading.answers import (
    FAILURE_KINDS,
    answer_result,
    candidate_result,
    failure,
    refusal,
    score_targets,
    unscored,
)
from serve.grading.audio import SAMPLE_RATE, AudioError, PreparedAnswer, split
from serve.grading.config import CandidateConfig, GraderConfig, PartConfig, ReviewConfig
from serve.grading.levels import DEFAULT_LEVELS
from serve.grading.parts import Part, resolve_part
from serve.grading.quality import measure
from serve.grading.results import Overall, Review, ScoredAnswer
from serve.grading.scoring import ChunkScore
from serve.session.schema import ANSWER_SCHEMA, CANDIDATES_SCHEMA, answer_of_row, arrow_type, result_of_row
from serve.session.stages import answer_row
from tests.audio_fixtures import speechlike
from tests.fake_engine import LetterTokenizer


def field_tree(model: type[BaseModel]) -> dict:
    """A model's field names, nested models as subtrees."""
    out = {}
    for name, f in model.model_fields.items():
        sub = arrow_type(f.annotation)
        out[name] = struct_tree(sub)
    return out


def struct_tree(t: pa.DataType):
    if isinstance(t, pa.StructType):
        return {f.name: struct_tree(f.type) for f in t}
    if isinstance(t, pa.ListType):
        return [struct_tree(t.value_type)]
    if isinstance(t, pa.MapType):
        return {"<key>": struct_tree(t.item_type)}
    return None


def spec(review: ReviewConfig | None = None, aspects=()):
    pcfg = PartConfig(review=review or ReviewConfig(), aspects=list(aspects))
    cfg = GraderConfig(model={"base": "tiny", "untrained": True}, parts={"interview": pcfg})
    return resolve_part(Part("interview", pcfg, None), LetterTokenizer(), cfg)


def prepared(seconds: float, seed: int = 0) -> PreparedAnswer:
    wave = speechlike(seconds, seed=seed)
    return PreparedAnswer(split(wave, 30.0), measure(wave, SAMPLE_RATE, -50.0))


ASPECTS = ("fluency", "pronunciation", "language_use", "coherence")


def an_answer(
    seconds: float = 40.0, review: ReviewConfig | None = None, aspects=(), peaks: dict | None = None
) -> ScoredAnswer:
    """A scored answer with random distributions; ``peaks``: target (None: holistic) -> the label it is sure of."""
    p = prepared(seconds)
    rng = np.random.default_rng(1)
    s = spec(review, aspects)

    def dist(target):
        if peaks and target in peaks:
            return np.eye(6)[peaks[target]]
        return rng.dirichlet(np.ones(6))

    per_target = [
        [ChunkScore(c.start_s, c.end_s, dist(getattr(t, "aspect", None)), 0.8) for c in p.chunks] for t in s.targets
    ]
    return answer_result(s, p, *score_targets(s, per_target))


def test_the_bulk_row_has_every_field_of_the_http_answer_nested_alike():
    answer_fields = {k: v for k, v in field_tree(ScoredAnswer).items() if k not in ("part", "status")}
    row_fields = {f.name: struct_tree(f.type) for f in ANSWER_SCHEMA}
    assert {k: row_fields[k] for k in answer_fields} == answer_fields
    assert set(row_fields) - set(answer_fields) == {
        "response_id",
        "candidate_id",
        "part",
        "audio",
        "status",
        "error_kind",
        "error_message",
        "retryable",
    }
    candidate = {f.name: struct_tree(f.type) for f in CANDIDATES_SCHEMA}
    assert {k: candidate[k] for k in Overall.model_fields} == field_tree(Overall)


def test_a_field_added_to_a_model_appears_in_its_arrow_type():
    class Grown(Review):
        interval: tuple[float, float] | None = None
        aspects: dict[str, float] = {}

    names = [f.name for f in arrow_type(Grown)]
    assert names == ["needed", "reasons", "interval", "aspects"]
    assert arrow_type(Grown).field("aspects").type == pa.map_(pa.string(), pa.float64())


@pytest.mark.parametrize("aspects", [(), ASPECTS])
def test_an_answer_goes_through_arrow_and_back_unchanged(aspects):
    answer = an_answer(aspects=aspects)
    assert len(answer.chunks) == 2 and answer.quality is not None and answer.review is not None
    assert list(answer.aspects) == sorted(aspects)  # in the order of their ids, whatever the config's
    row = answer_row({"response_id": "r", "candidate_id": "c", "part": "interview", "audio": "a.wav"}, answer)
    (back,) = pa.Table.from_pylist([row], schema=ANSWER_SCHEMA).to_pylist()
    assert answer_of_row(back) == answer


def test_aspects_are_scored_like_the_holistic_score_and_judged_with_it():
    sure = {None: 3, "fluency": 3, "pronunciation": 3, "language_use": 3, "coherence": 3}  # all B2 (score 4)
    calm = an_answer(aspects=ASPECTS, peaks=sure)
    assert {a.cefr for a in calm.aspects.values()} == {"B2"} and calm.cefr == "B2"
    assert all(a.score == 4.0 and a.uncertainty.score_sd == 0 for a in calm.aspects.values())
    assert not {"aspect_uncertain", "aspects_disagree"} & set(calm.review.reasons)
    # The holistic score says C2, the aspects A1: a human should look.
    apart = an_answer(aspects=ASPECTS, peaks={None: 5, **{a: 0 for a in ASPECTS}})
    assert "aspects_disagree" in apart.review.reasons
    assert (
        "aspects_disagree"
        not in an_answer(
            aspects=ASPECTS, peaks={None: 5, **{a: 0 for a in ASPECTS}}, review=ReviewConfig(max_aspect_gap=None)
        ).review.reasons
    )
    # One aspect spread over all labels: its own uncertainty sends the answer to review.
    spread = an_answer(
        aspects=ASPECTS,
        peaks={k: v for k, v in sure.items() if k != "coherence"},
        review=ReviewConfig(max_score_sd=0.5),
    )
    assert spread.aspects["coherence"].uncertainty.score_sd > 0.5 and "aspect_uncertain" in spread.review.reasons
    # A part without aspects answers exactly as before: no aspects, none of their reasons.
    plain = an_answer()
    assert plain.aspects == {} and not any(r.startswith("aspect") for r in plain.review.reasons)


def test_answer_result_judges_the_answer_against_its_parts_thresholds():
    strict = an_answer(review=ReviewConfig(min_label_mass=0.9, max_score_sd=0.1))
    lenient = an_answer(review=ReviewConfig(min_label_mass=None, max_score_sd=None, max_chunk_spread=None))
    assert strict.review.needed and {"low_label_mass", "uncertain"} <= set(strict.review.reasons)
    assert "low_label_mass" not in lenient.review.reasons and "uncertain" not in lenient.review.reasons
    assert strict.score == lenient.score and strict.label_cefr == {lv.label: lv.cefr for lv in DEFAULT_LEVELS}


def test_candidate_result_over_scored_and_not_scorable_answers():
    a, b = an_answer(review=ReviewConfig(min_label_mass=0.9)), an_answer(seconds=10)
    silent = refusal("interview", AudioError("silence", "the audio is silent"), "x")
    levels = {"interview": DEFAULT_LEVELS}
    overall = candidate_result([a, silent, b], levels)  # the default rule: an unscorable answer withholds
    assert (overall.score, overall.cefr, overall.withheld, overall.scored) == (None, None, True, 2)
    assert [(w.kind, w.part) for w in overall.withheld_reasons] == [("not_scorable", "interview")]
    assert overall.by_part["interview"].score == pytest.approx((a.score + b.score) / 2)  # shown, not the result
    assert candidate_result([a, b], levels).score == pytest.approx((a.score + b.score) / 2)
    assert (overall.not_scorable, overall.failed, overall.complete) == (1, 0, True)
    assert overall.review.needed and overall.review.reasons[-1] == "not_scorable"
    assert "low_label_mass" in overall.review.reasons
    assert overall.aspects == {}
    x, y = an_answer(aspects=ASPECTS), an_answer(seconds=12, aspects=ASPECTS[:2])
    both = candidate_result([x, y], levels)
    assert both.aspects["fluency"] == pytest.approx((x.aspects["fluency"].score + y.aspects["fluency"].score) / 2)
    assert both.aspects["coherence"] == x.aspects["coherence"].score  # only the answers that have it
    none = candidate_result([silent, silent], {})
    assert (none.score, none.cefr, none.scored, none.not_scorable) == (None, None, 0, 2)
    assert (silent.status, silent.reason.kind, silent.response_id) == ("not_scorable", "silence", "x")


def test_noise_is_the_candidates_recording_not_scorable_like_silence():
    from serve.grading.answers import NOT_SCORABLE_KINDS, is_failure
    from serve.grading.audio import NOISE_MESSAGE

    noise = unscored("interview", "noise", NOISE_MESSAGE, "n")
    assert (noise.status, noise.reason.kind, noise.reason.message) == ("not_scorable", "noise", NOISE_MESSAGE)
    assert {"noise", "silence"} <= NOT_SCORABLE_KINDS and not is_failure("noise")
    result = candidate_result([an_answer(), noise], {"interview": DEFAULT_LEVELS})
    assert (result.not_scorable, result.failed, result.withheld) == (1, 0, True)
    assert result.review.reasons[-1] == "not_scorable"


def test_a_system_failure_is_not_the_candidates_and_makes_the_result_incomplete():
    a = an_answer()
    silent = unscored("interview", "silence", "the audio is silent", "s")
    engine = unscored("interview", "engine_error", "the engine failed", "e")
    row = unscored("nope", "unknown_part", "unknown part 'nope'", "u")
    assert (silent.status, engine.status, row.status) == ("not_scorable", "failed", "failed")
    assert engine.retryable and not row.retryable  # run again as it is / fix the manifest first
    overall = candidate_result([a, silent, engine, row], {"interview": DEFAULT_LEVELS})
    assert (overall.scored, overall.not_scorable, overall.failed, overall.complete) == (1, 1, 2, False)
    assert overall.score is None and overall.withheld  # the grader failed: no result until scored again
    assert {(w.kind, w.part) for w in overall.withheld_reasons} == {
        ("not_scorable", "interview"),
        ("incomplete", "interview"),
        ("incomplete", "nope"),
    }
    assert overall.review.needed and overall.review.reasons[-2:] == ["not_scorable", "incomplete"]
    only_failed = candidate_result([engine], {})
    assert only_failed.review.reasons == ["incomplete"] and only_failed.not_scorable == 0
    assert candidate_result([a], {"interview": DEFAULT_LEVELS}).complete  # nothing failed
    for kind, retryable in FAILURE_KINDS.items():  # a session's row of each kind says the same
        r = answer_row({"response_id": "r", "candidate_id": "c", "part": "p", "audio": "a.wav"}, kind=kind, message="m")
        assert (r["status"], r["retryable"]) == ("failed", retryable)
        (back,) = pa.Table.from_pylist([r], schema=ANSWER_SCHEMA).to_pylist()
        assert result_of_row(back) == failure("p", kind, "m", "r")
    r = answer_row(
        {"response_id": "r", "candidate_id": "c", "part": "p", "audio": "a.wav"}, kind="silence", message="m"
    )
    assert (r["status"], r["retryable"]) == ("not_scorable", None)


def test_a_batch_keeps_what_was_scored_when_the_scorer_fails_on_an_answer():
    """The batch endpoint's door: an answer the scorer failed on is ``failed`` (retryable), not the candidate's
    ``not_scorable``; when none could be scored the batch gets the error, to be retried whole."""
    import asyncio
    import time
    from types import SimpleNamespace

    from serve.service.errors import ApiError
    from serve.service.ingress import Ingress
    from serve.service.uploads import ScoreUpload

    part = SimpleNamespace(part="interview", config=SimpleNamespace(levels=DEFAULT_LEVELS))
    answer = an_answer(seconds=12)

    async def resolve(name):
        return part

    async def prepare(upload):
        if upload.response_id == "silent":
            raise ApiError(422, "silence", "the audio is silent")
        return prepared(12)

    async def score(upload, part, p):
        if upload.response_id == "crash":
            raise RuntimeError("CUDA error: an illegal memory access")
        if upload.response_id == "down":
            raise ApiError(503, "unavailable", "the scorer is not available")
        return answer

    ingress = object.__new__(Ingress)  # its routes' logic, without Ray Serve
    ingress.cfg = SimpleNamespace(serving=SimpleNamespace(max_batch_audio_s=3600), candidate=CandidateConfig())
    ingress.metrics = SimpleNamespace(record_review=lambda *_: None)
    ingress._part, ingress._prepare, ingress._score = resolve, prepare, score

    def batch(*ids):
        uploads = [ScoreUpload("interview", b"", rid) for rid in ids]
        return asyncio.run(ingress._score_batch(SimpleNamespace(candidate_id="c"), uploads, time.perf_counter()))

    got = batch("ok", "silent", "crash", "down")
    assert [r.status for r in got.results] == ["scored", "not_scorable", "failed", "failed"]
    crash, down = got.results[2:]
    assert (crash.reason.kind, crash.retryable, down.reason.kind, down.retryable) == (
        "engine_error",
        True,
        "unavailable",
        True,
    )
    assert "CUDA" not in crash.reason.message  # no exception text to the client (the log has it)
    o = got.overall
    assert (o.scored, o.not_scorable, o.failed, o.complete, o.score, o.withheld) == (1, 1, 2, False, None, True)
    assert o.review.reasons[-2:] == ["not_scorable", "incomplete"]
    assert got.model_dump()["results"][2]["status"] == "failed"  # the response model takes it as it is
    with pytest.raises(ApiError) as e:
        batch("silent", "down")
    assert e.value.status == 503
