"""The one answer pipeline: every door (HTTP, batch, CLI, bulk session, evaluation) makes its results here.

- :func:`answer_result`: a part, an answer's decoded audio (its chunks and
  measured quality) and the engine's label distributions of its chunks ->
  the complete :class:`ScoredAnswer` (score, uncertainty, quality, review).
- :func:`refusal`: an answer whose audio could not be used -> :class:`NotScorable`.
- :func:`candidate_result`: a candidate's answers -> :class:`Overall` with its review.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from serve.grading.audio import AudioError, PreparedAnswer
from serve.grading.levels import Level, nearest_level
from serve.grading.parts import PartSpec
from serve.grading.results import NotScorable, NotScorableReason, Overall, Review, ScoredAnswer
from serve.grading.review import assess, overall_review
from serve.grading.scoring import ChunkScore, aggregate, aspect_score

#: Audio refusals that make an answer ``not_scorable`` (a batch or a session goes on with the other answers).
NOT_SCORABLE_KINDS = frozenset({"empty", "undecodable", "unsupported_audio", "silence"})


def answer_result(
    spec: PartSpec,
    prepared: PreparedAnswer,
    chunk_scores: Sequence[ChunkScore],
    aspect_chunk_scores: Mapping[str, Sequence[ChunkScore]] | None = None,
) -> ScoredAnswer:
    """The complete answer: its chunks' distributions combined (the holistic score's, and each aspect's from
    ``aspect_chunk_scores``), judged against the part's review thresholds."""
    answer = aggregate(spec.part, spec.levels, chunk_scores, spec.model, spec.intervals)
    got = aspect_chunk_scores or {}
    missing = [a.aspect for a in spec.aspects if a.aspect not in got]
    if missing:
        raise ValueError(f"part {spec.part!r}: no scores for its aspects {missing}")
    if spec.aspects:
        answer.aspects = {
            a.aspect: aspect_score(a.levels, got[a.aspect], a.adapter_name, a.intervals, a.validated)
            for a in spec.aspects
        }
    return assess(answer, prepared.quality, spec.review)


def score_targets(spec: PartSpec, per_target: Sequence[Sequence[ChunkScore]]) -> tuple[list, dict]:
    """Chunk scores listed in the order of ``spec.targets`` -> (the holistic score's, {aspect: its})."""
    return list(per_target[0]), {a.aspect: list(s) for a, s in zip(spec.aspects, per_target[1:])}


def refusal(part: str, error: AudioError, response_id: str | None = None) -> NotScorable:
    """An answer that cannot be scored, with the kind and message the single-answer endpoint's 4xx carries."""
    return NotScorable(
        part=part, response_id=response_id, reason=NotScorableReason(kind=error.kind, message=str(error))
    )


def candidate_result(
    scores: Sequence[float],
    reviews: Sequence[Review],
    not_scorable: int,
    levels: Sequence[Level],
    aspects: Sequence[Mapping[str, float]] = (),
) -> Overall:
    """A candidate's overall result: the mean of their scored answers' ``scores`` (its CEFR level on ``levels``),
    each aspect's mean over the answers' ``aspects`` (aspect -> score) that have it, for review when any answer
    needs it (``reviews``) or could not be scored."""
    mean = cefr = None
    if scores:
        mean = float(sum(scores) / len(scores))
        cefr = nearest_level(tuple(levels), mean).cefr
    by_aspect: dict[str, list[float]] = {}
    for answer_aspects in aspects:
        for name, score in answer_aspects.items():
            by_aspect.setdefault(name, []).append(score)
    return Overall(
        score=mean,
        cefr=cefr,
        scored=len(scores),
        not_scorable=not_scorable,
        review=overall_review(list(reviews), not_scorable),
        aspects={name: float(sum(v) / len(v)) for name, v in sorted(by_aspect.items())},
    )
