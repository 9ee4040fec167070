"""What the OpenAPI document says about the routes that read their bodies themselves.

``POST /v1/score`` and ``/v1/score/batch`` parse their bodies within limits
(:mod:`serve.service.uploads`) instead of letting FastAPI read them whole, so
their request bodies are declared here, from the same pydantic models, with
examples: generated clients can call them. Each operation declares one content
type, the shape every client generator handles.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from serve.service.protocol import BatchRequest, ErrorResponse, PutPartRequest, ScoreRequest

_AUDIO_B64 = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAgD4AAAB9AAACABAAZGF0YQAAAAA="


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined (one self-contained object)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


SCORE_MULTIPART_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "title": "ScoreUpload",
                    "required": ["part", "audio"],
                    "properties": {
                        "part": {
                            "type": "string",
                            "description": "Exam part id (GET /v1/parts).",
                            "example": "interview",
                        },
                        "audio": {
                            "type": "string",
                            "format": "binary",
                            "description": "The answer's audio file: WAV, FLAC, OGG, MP3, WebM/Opus, MP4/M4A/AAC, ...",
                        },
                        "response_id": {"type": "string", "description": "Caller's id of the answer, echoed back."},
                    },
                },
                "encoding": {"audio": {"contentType": "audio/*, video/webm, video/mp4, application/octet-stream"}},
            },
        },
    }
}

#: ``POST /v1/score`` takes JSON too, but the document declares JSON on ``POST /v1/score/json`` only: an operation
#: with one required body in two content types breaks some client generators (openapi-python-client #1451).
SCORE_JSON_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": inline_schema(ScoreRequest),
                "example": {"part": "interview", "audio_base64": _AUDIO_B64, "response_id": "cand-17/part-1"},
            },
        },
    }
}

BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": inline_schema(BatchRequest),
                "example": {
                    "candidate_id": "cand-17",
                    "answers": [
                        {"part": "interview", "audio_base64": _AUDIO_B64, "response_id": "cand-17/part-1"},
                        {"part": "long_turn", "audio_base64": _AUDIO_B64, "response_id": "cand-17/part-3"},
                    ],
                },
            }
        },
    }
}

PUT_PART_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(PutPartRequest)}}}
}


#: ``GET /metrics`` answers Prometheus' text format, not JSON.
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format (version 0.0.4) of the whole deployment's metrics.",
        "content": {
            "text/plain": {"schema": {"type": "string"}, "example": "# TYPE ray_l2grader_requests_total counter\n"}
        },
    }
}


#: What the proxy guard may answer on any route: body too slow (408), too many requests from one client (429),
#: the service cannot take it now (503: bodies held, back-pressure, a replica lost).
GUARD_STATUSES = (408, 429, 503)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error statuses a route answers (those of the proxy guard too), each with the API's error body."""
    return {code: {"model": ErrorResponse} for code in sorted({*statuses, *GUARD_STATUSES})}
