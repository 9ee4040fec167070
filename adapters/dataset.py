"""Scored answers for training and evaluation: JSON lines in, chunks with their human score out.

One line per answer: ``{"audio": path, "score": float}`` with optional
``part``, ``speaker`` and ``aspects`` (the human score of each analytic
aspect scored: ``{"fluency": 4.5, ...}``; an answer without it trains and is
judged on the holistic score only); any other fields (a group such as ``l1`` or
``voice``) are kept in :attr:`Example.fields` for fairness tables. Relative audio paths resolve against the file's own
folder. Rows of another part than the one asked for are skipped. Answers are
decoded, checked and chunked exactly as serving does
(:func:`serve.grading.audio.prepare`): an answer longer than 30 s gives several
chunks, each trained on the answer's score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from serve.grading.audio import Chunk, prepare
from serve.grading.results import Quality


class DataError(ValueError):
    """A data file is missing or a line of it is malformed."""


@dataclass(frozen=True)
class Example:
    """One scored answer."""

    audio: Path
    score: float
    part: str | None = None
    speaker: str | None = None
    fields: dict = field(default_factory=dict, compare=False)  # the row's other fields (groups)
    aspects: dict[str, float] = field(default_factory=dict, compare=False)  # aspect -> human score


@dataclass(frozen=True)
class Answer:
    """A scored answer, decoded and chunked."""

    example: Example
    chunks: tuple[Chunk, ...]
    quality: Quality | None = None


@dataclass(frozen=True)
class TrainItem:
    """One chunk and the scores of the answer it belongs to."""

    answer_index: int
    chunk: Chunk
    score: float
    aspects: dict[str, float] = field(default_factory=dict, compare=False)  # aspect -> human score


def read_jsonl(path: str | Path, part: str | None = None) -> list[Example]:
    """The examples of a JSON-lines file (those of ``part`` only, when given)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"data file {path} not found") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            audio, score = row["audio"], float(row["score"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f'{path}:{n}: expected {{"audio": path, "score": number}}: {e}') from None
        if part is not None and row.get("part") not in (None, part):
            continue
        aspects = read_aspects(row.get("aspects"), f"{path}:{n}")
        audio_path = Path(audio).expanduser()
        if not audio_path.is_absolute():
            audio_path = path.resolve().parent / audio_path
        speaker = row.get("speaker")
        others = {k: v for k, v in row.items() if k not in ("audio", "score", "part", "speaker", "aspects")}
        speaker = None if speaker is None else str(speaker)
        out.append(Example(audio_path, score, row.get("part"), speaker, others, aspects))
    return out


def read_aspects(value, where: str) -> dict[str, float]:
    """A row's aspect scores ``{aspect: number}`` (none: ``{}``); :class:`DataError` when malformed."""
    if value is None:
        return {}
    try:
        if not isinstance(value, dict):
            raise TypeError(f"not a mapping: {value!r}")
        return {str(k): float(v) for k, v in value.items() if v is not None}
    except (TypeError, ValueError) as e:
        raise DataError(f'{where}: expected "aspects": {{aspect: number}}: {e}') from None


def load_answers(examples: list[Example], audio_cfg) -> tuple[list[Answer], list[tuple[Example, str]]]:
    """Decode and chunk every example; unusable audio is returned with its reason instead."""
    from serve.grading.audio import AudioError

    good, bad = [], []
    for ex in examples:
        try:
            prepared = prepare(ex.audio, audio_cfg)
            good.append(Answer(ex, tuple(prepared.chunks), prepared.quality))
        except AudioError as e:
            bad.append((ex, str(e)))
    return good, bad


def train_items(answers: list[Answer]) -> list[TrainItem]:
    """Every chunk of every answer, each labelled with its answer's scores."""
    return [TrainItem(i, c, a.example.score, a.example.aspects) for i, a in enumerate(answers) for c in a.chunks]


def answer_ids(answers: Sequence[Answer]) -> list[str]:
    """Each answer's audio id (:func:`serve.grading.calibration.audio_id`); ``DataError`` when a file cannot be read
    (an answer that cannot be identified cannot be kept out of a held-out set)."""
    from serve.grading.calibration import audio_id

    ids = []
    for a in answers:
        try:
            ids.append(audio_id(Path(a.example.audio).read_bytes()))
        except OSError as e:
            raise DataError(f"{a.example.audio}: cannot be read to identify it: {e.strerror or e}") from None
    return ids
