"""The multipart body of one answer, as an exam platform uploads it to ``POST /v1/score``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class MultipartAnswer:
    """A ready request body: its bytes, its Content-Type and where the audio file starts in it."""

    body: bytes
    content_type: str
    audio_offset: int

    def with_response_id(self, response_id: str, body: bytes | None = None) -> bytes:
        """``body`` (default: this one) with a ``response_id`` field in front, under the same boundary."""
        boundary = self.content_type.split("boundary=", 1)[1]
        field = f'--{boundary}\r\nContent-Disposition: form-data; name="response_id"\r\n\r\n{response_id}\r\n'
        return field.encode() + (self.body if body is None else body)


def multipart_answer(part: str, audio: bytes, filename: str, audio_type: str = "audio/wav") -> MultipartAnswer:
    """Form fields ``part`` and ``audio`` (the file) under a fresh boundary."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="part"\r\n\r\n{part}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="{filename}"\r\n'
        f"Content-Type: {audio_type}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return MultipartAnswer(head + audio + tail, f"multipart/form-data; boundary={boundary}", len(head))
