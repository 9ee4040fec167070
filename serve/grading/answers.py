"""The one answer pipeline: every door (HTTP, batch, CLI, bulk session, evaluation) makes its results here.

- :func:`answer_result`: a part, an answer's decoded audio (its chunks and
  measured quality) and the engine's label distributions of its chunks ->
  the complete :class:`ScoredAnswer` (score, uncertainty, quality, review).
- :func:`refusal`: an answer whose audio could not be used -> :class:`NotScorable`;
  :func:`failure`: an answer the grader failed to score -> :class:`FailedAnswer`;
  :func:`unscored`: either, by the error's kind.
- :func:`candidate_result`: a candidate's answers -> :class:`Overall` by the exam's stated rule (the config's
  ``candidate:`` section), with its review, the one builder of every door (the batch endpoint's ``overall``, a
  session's candidates table, ``l2grader score --candidate``, ``evaluate``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from serve.grading.audio import AudioError, PreparedAnswer
from serve.grading.candidate_calibration import NOT_CONFIGURED, CandidateIntervals
from serve.grading.classification import default_cuts, level_at, lowest_level
from serve.grading.config import CandidateConfig, Rule
from serve.grading.levels import Level
from serve.grading.parts import PartSpec
from serve.grading.results import (
    FailedAnswer,
    FailureReason,
    NotScorable,
    NotScorableReason,
    Overall,
    OverallInterval,
    PartOverall,
    Review,
    ScoredAnswer,
    WithheldReason,
)
from serve.grading.review import MISSING_PART, assess, overall_review
from serve.grading.scoring import ChunkScore, aggregate, aspect_score

#: Audio refusals that make an answer ``not_scorable`` (a batch or a session goes on with the other answers).
NOT_SCORABLE_KINDS = frozenset({"empty", "undecodable", "unsupported_audio", "silence", "noise"})

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


def _rule_words(rule: Rule) -> str:
    return "withhold" if rule == "withhold" else f"count as {rule.count_as:g}"


def _stated(rule: Rule) -> float | None:
    """The score a rule counts a part as (None: it withholds)."""
    return None if rule == "withhold" else float(rule.count_as)


def candidate_result(
    answers: Sequence[Answer],
    levels: Mapping[str, Sequence[Level]],
    rule: CandidateConfig | None = None,
    intervals: CandidateIntervals | None = None,
) -> Overall:
    """A candidate's overall result from their answers, at every door, by the exam's stated ``rule`` (the config's
    ``candidate:`` section; None: its defaults):

    1. each part's answers are averaged (an unscorable answer counted as the rule's stated score, where it says
       ``count_as``; where it says ``withhold`` the overall result is withheld, reason ``not_scorable``);
    2. a required part without answers is counted as the stated score, or withholds (``missing_part``);
    3. a failed answer (the grader's failure, never the candidate's) withholds it (``incomplete``: score again);
    4. the counted parts' means are combined with their normalised weights (every part answered, weight 1, when
       the rule lists none; an optional part without answers does not count; answers of parts not listed are
       shown with weight 0);
    5. the level is read from the cut-score table (default: the midpoints of the scale of the first counted part,
       ``levels`` being part -> its levels);
    6. the interval comes from the candidate-level calibration where ``intervals`` holds a fresh one
       (:func:`serve.grading.candidate_calibration.candidate_intervals`: the rule's ``calibration``, checked against
       the rule and the parts served now), else it is the weighted sum of the parts' interval bounds (the union
       bound); ``interval.method``, ``candidate_calibration`` and ``interval_detail`` say which and why
       (:class:`serve.grading.results.OverallInterval`).

    Each aspect's overall is the plain mean over the scored answers that have it; the review holds every scored
    answer's reasons, ``not_scorable`` and ``incomplete``.
    """
    rule = rule if rule is not None else CandidateConfig()
    intervals = intervals if intervals is not None else NOT_CONFIGURED
    scored = [a for a in answers if isinstance(a, ScoredAnswer)]
    not_scorable = sum(1 for a in answers if isinstance(a, NotScorable))
    failed = sum(1 for a in answers if isinstance(a, FailedAnswer))
    by_part: dict[str, list[Answer]] = {}
    for a in answers:
        by_part.setdefault(a.part, []).append(a)
    listed = list(rule.parts)
    # an optional part without answers does not count: the other parts' weights are normalised without it
    counted = [p for p in listed if rule.parts[p].required or p in by_part] if listed else list(by_part)
    weights = {p: (rule.parts[p].weight if listed else 1.0) for p in counted}
    total = sum(weights.values()) or 1.0

    withheld: list[WithheldReason] = []
    parts: dict[str, PartOverall] = {}
    low_sum = high_sum = 0.0
    interval_ok = True
    miscoverage = 0.0
    interval_answers = counted_answers = 0
    for part in dict.fromkeys([*counted, *by_part]):
        mine = by_part.get(part, [])
        weight = weights[part] / total if part in weights else 0.0
        values, lows, highs = [], [], []
        n_stated = 0
        for a in mine:
            if isinstance(a, ScoredAnswer):
                values.append(a.score)
                counted_answers += bool(weight)
                if a.interval is None:
                    interval_ok = interval_ok and weight == 0
                else:
                    lows.append(a.interval.low)
                    highs.append(a.interval.high)
                    if weight:
                        miscoverage += 1 - a.interval.coverage
                        interval_answers += 1
            elif isinstance(a, NotScorable) and weight:
                stated = _stated(rule.unscorable_rule(part))
                if stated is None:
                    withheld.append(
                        WithheldReason(
                            kind="not_scorable",
                            part=part,
                            message=f"an answer to {part} could not be scored ({a.reason.kind}); the rule withholds",
                        )
                    )
                else:
                    values.append(stated)
                    lows.append(stated)
                    highs.append(stated)
                    n_stated += 1
            elif isinstance(a, FailedAnswer) and weight:
                withheld.append(
                    WithheldReason(
                        kind="incomplete",
                        part=part,
                        message=f"the grader failed on an answer to {part} ({a.reason.kind}): score it again",
                    )
                )
        required = listed and part in rule.parts and rule.parts[part].required
        if not mine and required:
            stated = _stated(rule.missing_rule(part))
            if stated is None:
                withheld.append(
                    WithheldReason(
                        kind="missing_part",
                        part=part,
                        message=f"no answer to the required part {part}; the rule withholds",
                    )
                )
            else:
                values, lows, highs, n_stated = [stated], [stated], [stated], 1
        full = len(lows) == len(values) and bool(values)
        parts[part] = PartOverall(
            weight=weight,
            score=float(sum(values) / len(values)) if values else None,
            answers=len(mine),
            scored=sum(1 for a in mine if isinstance(a, ScoredAnswer)),
            counted_as=n_stated,
            interval_low=float(sum(lows) / len(lows)) if full else None,
            interval_high=float(sum(highs) / len(highs)) if full else None,
        )
        if weight:
            if full:
                low_sum += weight * parts[part].interval_low
                high_sum += weight * parts[part].interval_high
            else:
                interval_ok = False

    counted_parts = {p: v for p, v in parts.items() if v.weight > 0}
    if not withheld and (not counted_parts or any(v.score is None for v in counted_parts.values())):
        empty = [p for p, v in counted_parts.items() if v.score is None]
        withheld.append(
            WithheldReason(
                kind="nothing_counted",
                part=empty[0] if len(empty) == 1 else None,
                message="no scored answer to count" if not empty else f"nothing to count for {', '.join(empty)}",
            )
        )
    scale = next((tuple(levels[p]) for p in counted if levels.get(p)), ())
    if not scale and scored:
        scale = tuple(levels.get(scored[0].part, ()))
    cuts = [(c.cefr, c.min_score) for c in rule.cuts] if rule.cuts is not None else default_cuts(scale)
    score = cefr = interval = None
    status = "withheld"
    detail = "withheld: no overall score, no interval"
    if not withheld:
        score = float(sum(v.weight * v.score for v in counted_parts.values()))
        cefr = level_at(score, lowest_level(scale), cuts) if scale else None
        coverage = max(0.0, 1.0 - miscoverage)
        interval = intervals.interval(score, counted_answers)
        if interval is not None:
            status = "candidate_calibration"
            detail = (
                f"candidate calibration ({intervals.method}, {100 * intervals.coverage:g} %): {intervals.state.detail}"
            )
        else:
            why = f"candidate calibration not used ({intervals.state.status}: {intervals.state.detail})"
            if not interval_ok:
                status = "uncalibrated"
                detail = f"no interval: a counted answer has no interval; {why}"
            elif coverage < rule.interval_coverage or (interval_answers and coverage <= 0):
                status = "below_coverage"
                detail = (
                    f"no interval: the union bound guarantees {100 * coverage:.3g} %, below "
                    f"candidate.interval_coverage; {why}"
                )
            else:
                status = "union_bound"
                detail = f"the parts' intervals combined by the union bound; {why}"
                interval = OverallInterval(
                    low=low_sum, high=high_sum, width=high_sum - low_sum, coverage=coverage, answers=interval_answers
                )
    by_aspect: dict[str, list[float]] = {}
    for a in scored:
        for name, aspect in a.aspects.items():
            by_aspect.setdefault(name, []).append(aspect.score)
    review = overall_review([a.review for a in scored if a.review is not None], not_scorable, failed)
    if any(w.kind == "missing_part" for w in withheld) or any(v.counted_as and not v.answers for v in parts.values()):
        review = Review(needed=True, reasons=[*review.reasons, MISSING_PART])
    return Overall(
        score=score,
        cefr=cefr,
        withheld=bool(withheld),
        withheld_reasons=withheld,
        interval=interval,
        interval_status=status,
        candidate_calibration=intervals.state.status,
        interval_detail=detail,
        by_part=parts,
        rule=describe_rule(rule, {p: w / total for p, w in weights.items()}, cuts),
        scored=len(scored),
        not_scorable=not_scorable,
        failed=failed,
        complete=not failed,
        review=review,
        aspects={name: float(sum(v) / len(v)) for name, v in sorted(by_aspect.items())},
    )


def describe_rule(rule: CandidateConfig, weights: Mapping[str, float], cuts: Sequence[tuple[str, float]]) -> str:
    """The rule a result was made by, in words (the result's ``rule``)."""
    listed = ", ".join(f"{p} {w:.3g}" for p, w in weights.items())
    parts = f"weights {listed}" if rule.parts else f"every part answered, equal weights ({listed})"
    required = [p for p, c in rule.parts.items() if c.required]
    own = [
        f"{p}: unscorable {_rule_words(c.unscorable)}" for p, c in rule.parts.items() if c.unscorable is not None
    ] + [f"{p}: missing {_rule_words(c.missing)}" for p, c in rule.parts.items() if c.missing is not None]
    return (
        f"mean of each part's answers, then {parts}; unscorable answer: {_rule_words(rule.unscorable)}; "
        + (f"required parts {', '.join(required)}, missing: {_rule_words(rule.missing)}; " if required else "")
        + (f"{'; '.join(own)}; " if own else "")
        + "failed answer: withhold; cuts "
        + (", ".join(f"{c} {s:g}" for c, s in cuts) or "none")
    )
