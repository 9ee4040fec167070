"""The Arrow schemas of a session's output, derived from the answer models every door returns.

:data:`ANSWER_SCHEMA` is the manifest's columns, the row's status and error,
then every field of :class:`serve.grading.results.ScoredAnswer` (nested
models as structs, ``dict[str, x]`` as maps, lists as lists), so a field added
to the answer appears in the Parquet output without another edit.
:data:`CANDIDATES_SCHEMA` is a candidate's id, answers and parts, then every
field of :class:`serve.grading.results.Overall` (what the batch endpoint's
``overall`` holds). :func:`answer_of_row` turns a row back into the answer.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel

from serve.grading.answers import Answer, unscored
from serve.grading.results import Overall, ScoredAnswer
from serve.session.sources import COLUMNS

SCORED, NOT_SCORABLE, FAILED = "scored", "not_scorable", "failed"

_SCALARS = {float: pa.float64(), int: pa.int64(), bool: pa.bool_(), str: pa.string()}


def arrow_type(annotation: Any) -> pa.DataType:
    """The Arrow type of a field's annotation (optional fields are nullable columns of the inner type)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"no Arrow type for the union {annotation}")
        return arrow_type(inner[0])
    if origin is Literal:
        return arrow_type(type(args[0]))
    if origin is dict:
        return pa.map_(arrow_type(args[0]), arrow_type(args[1]))
    if origin in (list, tuple):
        return pa.list_(arrow_type(args[0]))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(model_fields(annotation))
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    raise TypeError(f"no Arrow type for {annotation}")


def model_fields(model: type[BaseModel], skip: frozenset[str] = frozenset()) -> list[pa.Field]:
    """One Arrow field per model field, in the model's order."""
    return [pa.field(name, arrow_type(f.annotation)) for name, f in model.model_fields.items() if name not in skip]


#: One row per answer: the manifest's columns, ``status`` (scored | not_scorable | failed), the error of an answer
#: that was not scored (and, for a failed one, whether running again may score it), and the answer's fields
#: (``part`` and ``status`` are the row's own).
ANSWER_SCHEMA = pa.schema(
    [
        *(pa.field(c, pa.string()) for c in COLUMNS),
        pa.field("status", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("retryable", pa.bool_()),
        *model_fields(ScoredAnswer, skip=frozenset({"part", "status"})),
    ]
)

#: One row per candidate: their id, how many answers they have, the parts scored, and the batch endpoint's
#: ``overall`` (mean score and CEFR level of the scored answers, counts, review).
CANDIDATES_SCHEMA = pa.schema(
    [
        pa.field("candidate_id", pa.string()),
        pa.field("answers", pa.int64()),
        pa.field("parts", pa.list_(pa.string())),
        *model_fields(Overall),
    ]
)


def _plain(value: Any, type_: pa.DataType) -> Any:
    """An Arrow value as the model reads it back (maps come back as lists of pairs)."""
    if value is None:
        return None
    if isinstance(type_, pa.MapType):
        return {k: _plain(v, type_.item_type) for k, v in value}
    if isinstance(type_, pa.StructType):
        return {f.name: _plain(value[f.name], f.type) for f in type_}
    if isinstance(type_, pa.ListType):
        return [_plain(v, type_.value_type) for v in value]
    return value


def answer_of_row(row: dict) -> ScoredAnswer:
    """The scored answer a row holds (a row of ``status`` scored)."""
    fields = {
        name: _plain(row[name], ANSWER_SCHEMA.field(name).type)
        for name in ScoredAnswer.model_fields
        if name != "status"
    }
    return ScoredAnswer.model_validate(fields)


def result_of_row(row: dict) -> Answer:
    """The result a row holds: the scored answer, or why it has none (not scorable, or a failure)."""
    if row["status"] == SCORED:
        return answer_of_row(row)
    return unscored(row["part"] or "", row["error_kind"] or "", row["error_message"] or "", row["response_id"])
