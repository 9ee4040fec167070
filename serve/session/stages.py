"""The stages of the session pipeline, on Arrow batches.

1. :func:`prepare` (Ray tasks, CPU): reads each answer's audio, decodes,
   checks, measures and chunks it with :func:`serve.grading.audio.prepare`
   under the config's audio rules, as the service does; an answer that cannot
   be scored keeps its row, with the error's kind and message.
2. :class:`Scorer` (Ray actors, one engine each, one GPU each on GPU hosts):
   scores all chunks of a batch of answers in one call of
   :meth:`serve.engine.offline.OfflineEngine.score_answers`, the same engine,
   plugin and answer pipeline as ``l2grader score`` and the service, and
   returns one row per answer in :data:`serve.session.schema.ANSWER_SCHEMA`
   (errors included).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from serve.grading.answers import is_failure, unscored
from serve.grading.audio import SAMPLE_RATE, AudioError, Chunk, PreparedAnswer
from serve.grading.audio import prepare as prepare_audio
from serve.grading.config import GraderConfig, UnknownPartError
from serve.grading.parts import Part
from serve.grading.results import Quality, ScoredAnswer
from serve.session.schema import ANSWER_SCHEMA, FAILED, NOT_SCORABLE, SCORED, arrow_type
from serve.session.sources import COLUMNS, read_audio, resolve_audio

logger = logging.getLogger(__name__)

QUALITY_TYPE = arrow_type(Quality)

#: Columns the engine stage adds to its rows for the driver (not written): when the batch's scoring began and ended
#: (seconds since the epoch), so that throughput is measured over the scoring itself, not over when the driver
#: happens to receive the results (Ray Data hands several finished blocks over at once).
SCORING_FROM, SCORING_TO = "_scoring_from", "_scoring_to"


# ---------------------------------------------------------------- CPU stage


def _row_error(row: dict, parts: Mapping[str, Part]) -> AudioError | None:
    """What makes a manifest row unscorable before its audio is read (kinds ``invalid_row``, ``unknown_part``)."""
    empty = [c for c in ("candidate_id", "part", "audio") if not row[c]]
    if empty:
        return AudioError("invalid_row", f"empty {', '.join(empty)}")
    if row["part"] not in parts:
        return AudioError("unknown_part", str(UnknownPartError(row["part"], sorted(parts))))
    return None


def prepare(batch, cfg: GraderConfig, base: str, parts: Mapping[str, Part]):
    """Decode, check, measure and chunk the answers of a batch (a ``pyarrow.Table`` of the manifest's columns).

    Adds ``error_kind``, ``error_message`` (null when the answer is ready),
    ``samples`` (its 16 kHz mono float32 audio, the chunks back to back),
    ``chunk_edges`` (chunk boundaries in samples) and ``quality`` (measured on
    the whole answer).
    """
    max_bytes = int(cfg.audio.max_upload_mb * 1024 * 1024)
    kinds, messages, samples, edges, qualities = [], [], [], [], []
    for row in batch.to_pylist():
        err = _row_error(row, parts)
        chunks: list[Chunk] = []
        quality = None
        if err is None:
            try:
                prepared = prepare_audio(read_audio(resolve_audio(row["audio"], base), max_bytes), cfg.audio)
                chunks, quality = prepared.chunks, prepared.quality.model_dump()
            except AudioError as e:
                err = e
            except Exception as e:
                logger.exception("answer %s: unexpected error while preparing %s", row["response_id"], row["audio"])
                err = AudioError("internal_error", f"unexpected error while preparing the audio: {type(e).__name__}")
        kinds.append(None if err is None else err.kind)
        messages.append(None if err is None else str(err))
        qualities.append(quality)
        samples.append(np.concatenate([c.samples for c in chunks]).tobytes() if chunks else None)
        edges.append(
            [round(c.start_s * SAMPLE_RATE) for c in chunks] + [round(c.end_s * SAMPLE_RATE) for c in chunks[-1:]]
            if chunks
            else None
        )
    return (
        batch.select(list(COLUMNS))
        .append_column("error_kind", pa.array(kinds, pa.string()))
        .append_column("error_message", pa.array(messages, pa.string()))
        .append_column("samples", pa.array(samples, pa.large_binary()))
        .append_column("chunk_edges", pa.array(edges, pa.list_(pa.int64())))
        .append_column("quality", pa.array(qualities, QUALITY_TYPE))
    )


def unpack(row: dict) -> PreparedAnswer:
    """The prepared answer :func:`prepare` packed in a row (the same chunks :func:`serve.grading.audio.split` made)."""
    wave = np.frombuffer(row["samples"], dtype=np.float32)
    edges = row["chunk_edges"]
    chunks = [
        Chunk(start_s=a / SAMPLE_RATE, end_s=b / SAMPLE_RATE, samples=wave[a:b]) for a, b in zip(edges[:-1], edges[1:])
    ]
    return PreparedAnswer(chunks, Quality.model_validate(row["quality"]))


# ---------------------------------------------------------------- engine stage


def answer_row(
    row: dict, result: ScoredAnswer | None = None, kind: str | None = None, message: str | None = None
) -> dict:
    """The output row of a manifest row: its score, or why it has none (the candidate's audio: ``not_scorable``; a
    system failure: ``failed``, with whether running again may score it)."""
    out = {c: row[c] for c in COLUMNS}
    if result is None:
        kind = kind or "internal_error"
        if is_failure(kind):
            failed = unscored(row["part"] or "", kind, message or "", row["response_id"])
            return {
                **out,
                "status": FAILED,
                "error_kind": kind,
                "error_message": message,
                "retryable": failed.retryable,
            }
        return {**out, "status": NOT_SCORABLE, "error_kind": kind, "error_message": message, "retryable": None}
    fields = result.model_dump(exclude={"part", "status"})
    return {**out, "status": SCORED, "error_kind": None, "error_message": None, "retryable": None, **fields}


class Scorer:
    """A Ray Data stage holding one :class:`serve.engine.offline.OfflineEngine` (one per actor)."""

    def __init__(self, cfg: GraderConfig, parts: Mapping[str, Part]):
        # Imported here: the driver and the decode tasks load this module and must not load vLLM.
        from serve.engine.offline import OfflineEngine

        self.engine = OfflineEngine(cfg, parts)

    def __call__(self, batch):
        started = time.time()
        rows = batch.to_pylist()
        ready = [r for r in rows if r["error_kind"] is None]
        answers = [(r["part"], unpack(r)) for r in ready]
        scored = dict(zip((r["response_id"] for r in ready), self._score(answers)))
        out = []
        for r in rows:
            if r["error_kind"] is not None:
                out.append(answer_row(r, kind=r["error_kind"], message=r["error_message"]))
            elif isinstance(scored[r["response_id"]], ScoredAnswer):
                out.append(answer_row(r, scored[r["response_id"]]))
            else:
                out.append(answer_row(r, kind="engine_error", message=str(scored[r["response_id"]])[:500]))
        table = pa.Table.from_pylist(out, schema=ANSWER_SCHEMA)
        stamps = pa.array([started, time.time()], pa.float64())
        return table.append_column(SCORING_FROM, pa.repeat(stamps[0], len(out))).append_column(
            SCORING_TO, pa.repeat(stamps[1], len(out))
        )

    def _score(self, answers: list) -> list:
        """Results of a batch in one engine call; if that fails, answer by answer (an error for those that fail)."""
        try:
            return self.engine.score_answers(answers)
        except Exception as batch_error:  # noqa: BLE001 - isolated below
            logger.warning("a batch of %d answers failed (%s); scoring them one by one", len(answers), batch_error)
        results: list = []
        for answer in answers:
            try:
                results.extend(self.engine.score_answers([answer]))
            except Exception as e:  # noqa: BLE001 - recorded in the answer's row
                results.append(e)
        if results and all(isinstance(r, Exception) for r in results):
            raise results[0]  # the engine itself is broken: fail the task (Ray Data retries it or stops the run)
        return results
