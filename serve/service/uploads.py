"""Request bodies of the scoring routes: multipart uploads and JSON with base64 audio, read within limits.

A body is read with a size limit that holds whether or not it declares a
Content-Length (413 as soon as the limit is passed), then parsed into
:class:`ScoreUpload` (part, audio bytes, response id); the audio is decoded
later, in the ingress's bounded decoding pool. Every malformed body is a JSON
4xx: bad JSON or JSON nested too deep, multipart without a boundary or with
too many parts, bad base64 (MIME-style line breaks are accepted).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from serve.service.errors import ApiError, invalid_request
from serve.service.protocol import MAX_CLIENT_ID, BatchRequest, ScoreRequest
from serve.service.routes import Body, route_of
from serve.service.settings import ServiceConfig

M = TypeVar("M", bound=BaseModel)

#: Room for a body's framing around the audio (multipart headers, JSON keys).
FRAMING_BYTES = 64 * 1024
#: Largest body of PUT /v1/parts/{part} (a path, a task text and levels).
MAX_PART_BODY = 1024 * 1024
#: Largest body of any other request (a route that takes none, or no route).
MAX_OTHER_BODY = 64 * 1024


@dataclass(frozen=True)
class ScoreUpload:
    """One answer as received."""

    part: str
    audio: bytes
    response_id: str | None


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class UploadLimits:
    """How large an answer's audio, a score request's body and a batch's body may be."""

    def __init__(self, cfg: ServiceConfig):
        """The limits of ``cfg``: an answer's file (``audio.max_upload_mb``, every door's), the bodies'."""
        s = cfg.serving
        self.max_upload_mb = cfg.audio.max_upload_mb
        self.max_bytes = int(cfg.audio.max_upload_mb * 1024 * 1024)
        # One answer as multipart (the file as is) or as JSON (base64 inflates by 4/3), with room for the framing.
        self.max_score_body = self.max_bytes * 4 // 3 + FRAMING_BYTES
        self.max_batch_body = int(s.max_batch_upload_mb * 1024 * 1024)
        self.max_unsized_body = int(s.max_unsized_body_mb * 1024 * 1024)
        self.max_batch_answers = s.max_batch_answers
        self.by_body = {
            Body.NONE: MAX_OTHER_BODY,
            Body.ANSWER: self.max_score_body,
            Body.BATCH: self.max_batch_body,
            Body.PART: MAX_PART_BODY,
        }

    def body_limit(self, method: str, path: str) -> int:
        """The largest body a request of ``method`` to ``path`` may carry (what a proxy buffers at most for it),
        from the route table (:mod:`serve.service.routes`)."""
        route = route_of(method, path)
        return self.by_body[route.body if route is not None else Body.NONE]

    def check(self, n: int) -> None:
        if n > self.max_bytes:
            raise ApiError(413, "too_large", f"upload of {n} bytes exceeds the {self.max_upload_mb:g} MB limit")


async def read_body(request: Request, limit: int, what: str, unsized_limit: int | None = None) -> bytearray:
    """The whole body, refused with 413 as soon as it passes its limit (declared or streamed).

    ``limit`` holds for a body with a Content-Length (refused before reading
    when it declares more); one without (chunked) may hold at most
    ``unsized_limit``: Ray Serve's proxy pushes it into the replica as fast as
    the client sends, whatever is read, so only a small limit bounds memory.
    Kept as the buffer it was read into (no second copy of a large upload).
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"{what} of {int(declared)} bytes exceeds the {limit} bytes accepted")
    if not declared.isdigit() and unsized_limit is not None and unsized_limit < limit:
        limit, what = unsized_limit, f"{what} without Content-Length (send one for larger bodies)"
    buf = bytearray()
    async for piece in request.stream():
        buf += piece
        if len(buf) > limit:
            raise ApiError(413, "too_large", f"{what} exceeds the {limit} bytes accepted")
    return buf


def replayed(request: Request, body: bytes | bytearray) -> Request:
    """The same request with ``body`` as its (already read) stream, for Starlette's parsers to read again."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


def parse_json(body: bytes | bytearray, model: type[M]) -> M:
    """``body`` as ``model``: 422 unless it parses (bounded nesting) and validates."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(422, "invalid_request", "body is not valid JSON (or is nested too deeply)") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid_request(e.errors()) from None


async def read_json(
    request: Request, model: type[M], limit: int, *, json_type_required: bool = True, unsized_limit: int | None = None
) -> M:
    """The body as ``model``: 415 unless declared JSON (when required), 413 past its limit, 422 unless valid."""
    if json_type_required and content_type(request) != "application/json":
        raise ApiError(415, "unsupported_media_type", "this call takes application/json")
    return parse_json(await read_body(request, limit, "body", unsized_limit), model)


def b64decode(data: str) -> bytes:
    """Standard base64, with or without MIME line breaks; 422 otherwise."""
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "undecodable", "audio_base64 is not valid base64") from None


def json_answer(req: ScoreRequest, limits: UploadLimits) -> ScoreUpload:
    if len(req.audio_base64) > limits.max_bytes * 4 // 3 + 4096:
        raise ApiError(413, "too_large", f"upload exceeds the {limits.max_upload_mb:g} MB limit")
    audio = b64decode(req.audio_base64)
    limits.check(len(audio))
    return ScoreUpload(req.part, audio, req.response_id)


async def read_score_upload(request: Request, limits: UploadLimits) -> ScoreUpload:
    """One answer from a multipart (``part``, ``audio`` file, ``response_id``) or JSON body."""
    ctype = content_type(request)
    if ctype not in ("application/json", "multipart/form-data"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type {ctype[:100] or '(none)'!r} not accepted: use multipart/form-data or application/json",
        )
    body = await read_body(request, limits.max_score_body, "upload", limits.max_unsized_body)
    if ctype == "application/json":
        return json_answer(parse_json(body, ScoreRequest), limits)
    try:
        form = await replayed(request, body).form(max_files=1, max_fields=4)
    except (HTTPException, MultiPartException, ValueError) as e:
        detail = getattr(e, "detail", None) or getattr(e, "message", None) or "malformed"
        raise ApiError(422, "invalid_request", f"the multipart body cannot be parsed: {detail}") from None
    missing = [f for f in ("part", "audio") if f not in form]
    if missing:
        raise ApiError(422, "invalid_request", f"missing form field(s): {', '.join(missing)}")
    upload = form["audio"]
    if isinstance(upload, str):
        raise ApiError(422, "invalid_request", "form field 'audio' must be a file")
    audio = await upload.read()
    limits.check(len(audio))
    rid = form.get("response_id")
    if isinstance(rid, str) and len(rid) > MAX_CLIENT_ID:
        raise ApiError(422, "invalid_request", f"response_id is longer than {MAX_CLIENT_ID} characters")
    return ScoreUpload(str(form["part"]), audio, None if rid is None or not isinstance(rid, str) else rid)


async def read_batch_upload(request: Request, limits: UploadLimits) -> tuple[BatchRequest, list[ScoreUpload]]:
    """A candidate's answers from a JSON batch body: at most ``max_batch_answers``, each within the upload limit."""
    batch = await read_json(request, BatchRequest, limits.max_batch_body, unsized_limit=limits.max_unsized_body)
    if len(batch.answers) > limits.max_batch_answers:
        raise ApiError(
            413, "too_large", f"{len(batch.answers)} answers in one batch: at most {limits.max_batch_answers}"
        )
    return batch, [json_answer(a, limits) for a in batch.answers]
