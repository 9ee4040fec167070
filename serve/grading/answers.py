"""The one answer pipeline: every door (HTTP, batch, CLI, bulk session, evaluation) makes its results here.

- :func:`answer_result`: a part, an answer's decoded audio (its chunks and
  measured quality) and the engine's label distributions of its chunks ->
  the complete :class:`ScoredAnswer` (score, uncertainty, quality, review).
- :func:`refusal`: an answer whose audio could not be used -> :class:`NotScorable`;
  :func:`failure`: an answer the grader failed to score -> :class:`FailedAnswer`;
  :func:`unscored`: either, by the error's kind.
- :func:`candidate_result`: a candidate's answers -> :class:`Overall` with its review, the one builder of every
  door (the batch endpoint's ``overall``, a session's candidates table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from serve.grading.audio import AudioError, PreparedAnswer
from serve.grading.levels import Level, nearest_level
from serve.grading.parts import PartSpec
from serve.grading.results import (
    FailedAnswer,
    FailureReason,
    NotScorable,
    NotScorableReason,
    Overall,
    ScoredAnswer,
)
from serve.grading.review import assess, overall_review
from serve.grading.scoring import ChunkScore, aggregate, aspect_score

#: Audio refusals that make an answer ``not_scorable`` (a batch or a session goes on with the other answers).
NOT_SCORABLE_KINDS = frozenset({"empty", "undecodable", "unsupported_audio", "silence"})

#: System failures, kind -> retryable: the answer was not scored, but not because of the candidate's audio. They are
#: never counted as not scorable; the candidate's result is incomplete (``failed``, reason ``incomplete``).
FAILURE_KINDS = {
    "engine_error": True,  # the engine failed on the answer
    "internal_error": True,  # an unexpected error in the grader
    "unreadable": True,  # the audio file could not be read (missing, no access): put it in place and run again
    "invalid_row": False,  # a session's manifest row lacks a field: fix the manifest
    "unknown_part": False,  # a session's manifest row names no registered part: fix the manifest or register it
}

#: Any answer's result.
Answer = ScoredAnswer | NotScorable | FailedAnswer


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


def failure(part: str, kind: str, message: str, response_id: str | None = None) -> FailedAnswer:
    """An answer the grader failed to score (``kind`` one of :data:`FAILURE_KINDS`; any other kind is retryable)."""
    return FailedAnswer(
        part=part,
        response_id=response_id,
        reason=FailureReason(kind=kind, message=message),
        retryable=FAILURE_KINDS.get(kind, True),
    )


def is_failure(kind: str) -> bool:
    """Whether an error of this kind is a system failure (else the candidate's audio: not scorable)."""
    return kind in FAILURE_KINDS


def unscored(part: str, kind: str, message: str, response_id: str | None = None) -> NotScorable | FailedAnswer:
    """An answer without a score, by its error's kind: a system failure, or not scorable (the candidate's audio)."""
    if is_failure(kind):
        return failure(part, kind, message, response_id)
    return refusal(part, AudioError(kind, message), response_id)


def candidate_result(answers: Sequence[Answer], levels: Mapping[str, Sequence[Level]]) -> Overall:
    """A candidate's overall result from their answers, at every door: the mean of the scored answers' scores (its
    CEFR level on the ``levels`` of the first scored answer's part, part -> levels), each aspect's mean over the
    scored answers that have it, the counts of each status, for review when any answer needs it, could not be
    scored (``not_scorable``) or failed (``incomplete``: failures are the grader's, never the candidate's)."""
    scored = [a for a in answers if isinstance(a, ScoredAnswer)]
    not_scorable = sum(1 for a in answers if isinstance(a, NotScorable))
    failed = sum(1 for a in answers if isinstance(a, FailedAnswer))
    mean = cefr = None
    if scored:
        mean = float(sum(a.score for a in scored) / len(scored))
        scale = tuple(levels.get(scored[0].part, ()))
        cefr = nearest_level(scale, mean).cefr if scale else None
    by_aspect: dict[str, list[float]] = {}
    for a in scored:
        for name, aspect in a.aspects.items():
            by_aspect.setdefault(name, []).append(aspect.score)
    return Overall(
        score=mean,
        cefr=cefr,
        scored=len(scored),
        not_scorable=not_scorable,
        failed=failed,
        complete=not failed,
        review=overall_review([a.review for a in scored if a.review is not None], not_scorable, failed),
        aspects={name: float(sum(v) / len(v)) for name, v in sorted(by_aspect.items())},
    )
