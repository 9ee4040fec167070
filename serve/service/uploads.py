"""Request bodies of the scoring routes: multipart uploads and JSON with base64 audio, size-checked.

A body is parsed into a :class:`ScoreUpload` (part, audio bytes, response
id); the audio is decoded later, in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from serve.service.errors import ApiError, invalid_request
from serve.service.protocol import BatchRequest, ScoreRequest

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ScoreUpload:
    """One answer as received."""

    part: str
    audio: bytes
    response_id: str | None


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class UploadLimits:
    """The largest audio a request may carry."""

    def __init__(self, max_upload_mb: float):
        self.max_upload_mb = max_upload_mb
        self.max_bytes = int(max_upload_mb * 1024 * 1024)

    def check(self, n: int) -> None:
        if n > self.max_bytes:
            raise ApiError(413, "too_large", f"upload of {n} bytes exceeds the {self.max_upload_mb:g} MB limit")

    def check_declared_length(self, request: Request) -> None:
        """Refuse at once a body whose Content-Length is over the limit (base64 inflates by 4/3, multipart frames)."""
        length = request.headers.get("content-length")
        if length and length.isdigit():
            self.check(int(int(length) * 3 / 4) - 4096)


async def read_json(request: Request, model: type[M], *, json_type_required: bool = True) -> M:
    """The body as ``model``: 415 unless declared JSON (when required), 422 unless it parses and validates."""
    if json_type_required and content_type(request) != "application/json":
        raise ApiError(415, "unsupported_media_type", "this call takes application/json")
    try:
        data = await request.json()
    except ValueError:
        raise ApiError(422, "invalid_request", "body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid_request(e.errors()) from None


def b64decode(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "undecodable", "audio_base64 is not valid base64") from None


def json_answer(req: ScoreRequest, limits: UploadLimits) -> ScoreUpload:
    audio = b64decode(req.audio_base64)
    limits.check(len(audio))
    return ScoreUpload(req.part, audio, req.response_id)


async def read_score_upload(request: Request, limits: UploadLimits) -> ScoreUpload:
    """One answer from a multipart (``part``, ``audio`` file, ``response_id``) or JSON body."""
    limits.check_declared_length(request)
    ctype = content_type(request)
    if ctype == "application/json":
        return json_answer(await read_json(request, ScoreRequest), limits)
    if ctype == "multipart/form-data":
        form = await request.form()
        missing = [f for f in ("part", "audio") if f not in form]
        if missing:
            raise ApiError(422, "invalid_request", f"missing form field(s): {', '.join(missing)}")
        upload = form["audio"]
        if isinstance(upload, str):
            raise ApiError(422, "invalid_request", "form field 'audio' must be a file")
        audio = await upload.read()
        limits.check(len(audio))
        rid = form.get("response_id")
        return ScoreUpload(str(form["part"]), audio, None if rid is None else str(rid))
    raise ApiError(415, "unsupported_media_type",
                   f"content type {ctype or '(none)'!r} not accepted: use multipart/form-data or application/json")


async def read_batch_upload(request: Request, limits: UploadLimits) -> tuple[BatchRequest, list[ScoreUpload]]:
    """A candidate's answers from a JSON batch body (each answer within the upload limit)."""
    batch = await read_json(request, BatchRequest)
    return batch, [json_answer(a, limits) for a in batch.answers]
