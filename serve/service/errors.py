"""Errors of the HTTP API: one JSON shape, answered by handlers registered on the app.

Every error is ``{"error": {"kind", "message"}, "request_id"}``. Routes raise
:class:`ApiError`; FastAPI's own validation errors are formatted by the same
function as config errors; anything unexpected becomes a 500 in
:class:`serve.service.metrics.RequestMetrics`, which also counts it.
"""

from __future__ import annotations

import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve.grading.config import format_validation_errors
from serve.runtime.ray_private import serve_request_id
from serve.service.protocol import ErrorResponse


class ApiError(Exception):
    """An error answered as ``{"error": {"kind", "message"}, "request_id"}`` with ``status``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def request_id() -> str:
    """Ray Serve's id of the current request (also in Serve's access logs and X-Request-ID), or a fresh one."""
    try:
        rid = serve_request_id()
    except Exception:  # noqa: BLE001 - outside a Serve request there is no context
        rid = ""
    return rid or uuid.uuid4().hex


def error_response(err: ApiError) -> JSONResponse:
    """The JSON answer of an error (Ray Serve adds X-Request-ID)."""
    body = ErrorResponse(error={"kind": err.kind, "message": err.message}, request_id=request_id())
    return JSONResponse(body.model_dump(), status_code=err.status, headers=err.headers)


def invalid_request(errors) -> ApiError:
    """A 422 for a body that does not validate (pydantic's or FastAPI's error list)."""
    return ApiError(422, "invalid_request", format_validation_errors(errors))


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    request.state.error_kind = exc.kind
    return error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await _api_error(request, invalid_request(exc.errors()))


#: Kinds of the errors the framework raises itself (unknown path, wrong method, ...).
HTTP_KINDS = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = HTTP_KINDS.get(exc.status_code, "http_error")
    return await _api_error(request, ApiError(exc.status_code, kind, str(exc.detail)[:500], dict(exc.headers or {})))


def internal_error() -> ApiError:
    """The 500 of an unexpected failure: no exception text, traceback, address or path (the log has them)."""
    return ApiError(500, "internal", f"internal error while scoring; quote request id {request_id()} when reporting it")


def install_error_handlers(app: FastAPI) -> None:
    """Answer :class:`ApiError`, validation and framework errors in the API's JSON shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
