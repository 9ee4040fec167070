"""The stages of the session pipeline, on Arrow batches.

1. :func:`prepare` (Ray tasks, CPU): reads each answer's audio, decodes, checks
   and chunks it with :func:`serve.grading.audio.prepare_answer` under the
   config's audio rules; an answer that cannot be scored keeps its row, with
   the error's kind and message.
2. :class:`Scorer` (Ray actors, one engine each, one GPU each on GPU hosts):
   scores all chunks of a batch of answers in one call of
   :meth:`serve.engine.offline.OfflineEngine.score_answers`, the same engine,
   plugin and arithmetic as ``l2grader score``, and returns one row per
   answer in :data:`ANSWER_SCHEMA` (errors included).
"""

from __future__ import annotations

import logging

import numpy as np

from serve.grading.audio import SAMPLE_RATE, AudioError, Chunk, prepare_answer
from serve.grading.config import GraderConfig
from serve.grading.results import ScoredAnswer
from serve.session.sources import COLUMNS, read_audio, resolve_audio

logger = logging.getLogger(__name__)

SCORED, NOT_SCORABLE = "scored", "not_scorable"


def _answer_schema():
    import pyarrow as pa

    return pa.schema(
        [
            *((c, pa.string()) for c in COLUMNS),
            ("status", pa.string()),  # scored | not_scorable
            ("error_kind", pa.string()),
            ("error_message", pa.string()),
            ("score", pa.float64()),
            ("hard_score", pa.float64()),
            ("cefr", pa.string()),
            ("probabilities", pa.map_(pa.string(), pa.float64())),
            (
                "chunks",
                pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("score", pa.float64())])),
            ),
            ("duration_s", pa.float64()),
            (
                "model",
                pa.struct(
                    [
                        ("base", pa.string()),
                        ("adapter", pa.string()),
                        ("adapter_hash", pa.string()),
                        ("untrained", pa.bool_()),
                    ]
                ),
            ),
        ]
    )


#: One row per answer: the manifest's columns, the status, the error (if any) and the service's answer fields.
ANSWER_SCHEMA = _answer_schema()


# ---------------------------------------------------------------- CPU stage


def _row_error(row: dict, parts: set[str]) -> AudioError | None:
    """What makes a manifest row unscorable before its audio is read (kinds ``invalid_row``, ``unknown_part``)."""
    empty = [c for c in ("candidate_id", "part", "audio") if not row[c]]
    if empty:
        return AudioError("invalid_row", f"empty {', '.join(empty)}")
    if row["part"] not in parts:
        return AudioError(
            "unknown_part", f"unknown part {row['part'][:64]!r} (known parts: {', '.join(sorted(parts))})"
        )
    return None


def prepare(batch, cfg: GraderConfig, base: str):
    """Decode, check and chunk the answers of a batch (a ``pyarrow.Table`` of the manifest's columns).

    Adds ``error_kind``, ``error_message`` (null when the answer is ready),
    ``samples`` (its 16 kHz mono float32 audio, the chunks back to back) and
    ``chunk_edges`` (chunk boundaries in samples).
    """
    import pyarrow as pa

    max_bytes = int(cfg.audio.max_upload_mb * 1024 * 1024)
    kinds, messages, samples, edges = [], [], [], []
    for row in batch.to_pylist():
        err = _row_error(row, set(cfg.parts))
        chunks: list[Chunk] = []
        if err is None:
            try:
                chunks = prepare_answer(read_audio(resolve_audio(row["audio"], base), max_bytes), cfg.audio)
            except AudioError as e:
                err = e
            except Exception as e:
                logger.exception("answer %s: unexpected error while preparing %s", row["response_id"], row["audio"])
                err = AudioError("internal_error", f"unexpected error while preparing the audio: {type(e).__name__}")
        kinds.append(None if err is None else err.kind)
        messages.append(None if err is None else str(err))
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
    )


def unpack_chunks(samples: bytes, edges: list[int]) -> list[Chunk]:
    """The chunks :func:`prepare` packed (the same bounds :func:`serve.grading.audio.split` made)."""
    wave = np.frombuffer(samples, dtype=np.float32)
    return [
        Chunk(start_s=a / SAMPLE_RATE, end_s=b / SAMPLE_RATE, samples=wave[a:b]) for a, b in zip(edges[:-1], edges[1:])
    ]


# ---------------------------------------------------------------- engine stage


def answer_row(
    row: dict, result: ScoredAnswer | None = None, kind: str | None = None, message: str | None = None
) -> dict:
    """The output row of a manifest row: its score, or why it has none."""
    out = {c: row[c] for c in COLUMNS}
    if result is None:
        return {**out, "status": NOT_SCORABLE, "error_kind": kind, "error_message": message}
    fields = result.model_dump()
    fields["probabilities"] = list(fields["probabilities"].items())
    return {**out, "status": SCORED, "error_kind": None, "error_message": None, **fields}


class Scorer:
    """A Ray Data stage holding one :class:`serve.engine.offline.OfflineEngine` (one per actor)."""

    def __init__(self, cfg: GraderConfig):
        from serve.engine.offline import OfflineEngine

        self.engine = OfflineEngine(cfg)

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        ready = [r for r in rows if r["error_kind"] is None]
        answers = [(r["part"], unpack_chunks(r["samples"], r["chunk_edges"])) for r in ready]
        scored = dict(zip((r["response_id"] for r in ready), self._score(answers)))
        out = []
        for r in rows:
            if r["error_kind"] is not None:
                out.append(answer_row(r, kind=r["error_kind"], message=r["error_message"]))
            elif isinstance(scored[r["response_id"]], ScoredAnswer):
                out.append(answer_row(r, scored[r["response_id"]]))
            else:
                out.append(answer_row(r, kind="engine_error", message=str(scored[r["response_id"]])[:500]))
        return pa.Table.from_pylist(out, schema=ANSWER_SCHEMA)

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
