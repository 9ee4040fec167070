"""The Ingress deployment: the HTTP API (FastAPI on Ray Serve).

It authenticates, decodes and checks uploads (in a worker thread, so decoding
never blocks the event loop), cuts them into chunks and forwards them to the
Scorer deployment with the part's model id, which Ray Serve's multiplexing
uses to pick a replica that already holds the part's adapter. It scales
separately from the scorer, so audio decoding never starves the engine.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve.api_models import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    Overall,
    PartInfo,
    PartsResponse,
    PutPartRequest,
    ScoreRequest,
    ScoreResponse,
)
from serve.audio import AudioError, prepare_answer
from serve.config import UnknownPartError, load_config
from serve.levels import nearest_level
from serve.metrics import Metrics
from serve.registry import PartRegistry, default_registry_file

logger = logging.getLogger("ray.serve")

API_VERSION = "v1"
AUDIO_STATUS = {"empty": 422, "undecodable": 422, "unreadable": 422, "silence": 422, "too_long": 413}

app = FastAPI(
    title="l2-oral-grader",
    version="0.1.0",
    description="CEFR-aligned scores for spoken English answers, one exam part per answer.",
)


class ApiError(Exception):
    """An error answered as ``{"error": {"kind", "message"}, "request_id"}``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def request_id() -> str:
    """Ray Serve's id of the current request (also in Serve's access logs), or a fresh one."""
    try:
        rid = serve.context._get_serve_request_context().request_id
    except Exception:
        rid = ""
    return rid or uuid.uuid4().hex


def _error_response(err: ApiError, rid: str) -> JSONResponse:
    body = ErrorResponse(error={"kind": err.kind, "message": err.message}, request_id=rid)
    return JSONResponse(body.model_dump(), status_code=err.status, headers=err.headers)  # Serve adds X-Request-ID


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
    return _error_response(ApiError(422, "invalid_request", problems), request_id())


def _keys(env_name: str | None) -> list[str]:
    if not env_name:
        return []
    return [k.strip() for k in os.environ.get(env_name, "").split(",") if k.strip()]


def _parse_json_score_request(data: Any) -> ScoreRequest:
    try:
        return ScoreRequest.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
        raise ApiError(422, "invalid_request", problems) from None


def _b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "undecodable", "audio_base64 is not valid base64") from None


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """HTTP front of the grader."""

    def __init__(self, scorer: DeploymentHandle, config_path: str):
        self.cfg = load_config(config_path)
        self.scorer = scorer
        registry_file = self.cfg.serving.registry_file or default_registry_file(config_path)
        self.registry = PartRegistry(self.cfg, Path(registry_file))
        self.metrics = Metrics()
        self.api_keys = _keys(self.cfg.serving.api_keys_env)
        self.admin_keys = _keys(self.cfg.serving.admin_keys_env)
        self.max_upload = int(self.cfg.audio.max_upload_mb * 1024 * 1024)

    # ------------------------------------------------------------ helpers

    def _authorize(self, request: Request, admin: bool = False) -> None:
        if not self.api_keys and not self.admin_keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            raise ApiError(401, "unauthorized", "missing 'Authorization: Bearer <key>' header",
                           {"WWW-Authenticate": "Bearer"})
        is_admin = any(hmac.compare_digest(token, k) for k in self.admin_keys)
        is_user = is_admin or any(hmac.compare_digest(token, k) for k in self.api_keys)
        if not is_user:
            raise ApiError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "Bearer"})
        if admin and not is_admin:
            raise ApiError(403, "forbidden", "this call needs an admin key")

    def _check_size(self, n: int) -> None:
        if n > self.max_upload:
            raise ApiError(413, "too_large", f"upload of {n} bytes exceeds the {self.cfg.audio.max_upload_mb:g} MB limit")

    async def _read_score_request(self, request: Request) -> tuple[ScoreRequest | None, bytes, str, str | None]:
        """(json request or None, audio bytes, part, response_id) from a JSON or multipart body."""
        length = request.headers.get("content-length")
        if length and length.isdigit():
            # base64 inflates by 4/3; allow for it and for multipart framing.
            self._check_size(int(int(length) * 3 / 4) - 4096)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                data = await request.json()
            except ValueError:
                raise ApiError(422, "invalid_request", "body is not valid JSON") from None
            req = _parse_json_score_request(data)
            audio = _b64(req.audio_base64)
            self._check_size(len(audio))
            return req, audio, req.part, req.response_id
        if ctype == "multipart/form-data":
            form = await request.form()
            missing = [f for f in ("part", "audio") if f not in form]
            if missing:
                raise ApiError(422, "invalid_request", f"missing form field(s): {', '.join(missing)}")
            upload = form["audio"]
            if isinstance(upload, str):
                raise ApiError(422, "invalid_request", "form field 'audio' must be a file")
            audio = await upload.read()
            self._check_size(len(audio))
            rid = form.get("response_id")
            return None, audio, str(form["part"]), None if rid is None else str(rid)
        raise ApiError(415, "unsupported_media_type",
                       f"content type {ctype or '(none)'!r} not accepted: use multipart/form-data or application/json")

    async def _score(self, part: str, audio: bytes, response_id: str | None, rid: str, started: float) -> ScoreResponse:
        try:
            entry = self.registry.get(part)
        except UnknownPartError as e:
            raise ApiError(404, "unknown_part", str(e)) from None
        t0 = time.perf_counter()
        try:
            chunks = await asyncio.to_thread(prepare_answer, audio, self.cfg.audio)
        except AudioError as e:
            raise ApiError(AUDIO_STATUS.get(e.kind, 422), e.kind, str(e)) from None
        self.metrics.decode.observe(time.perf_counter() - t0)
        handle = self.scorer.options(multiplexed_model_id=entry.model_id)
        try:
            result = await handle.score.remote(part, entry.config.model_dump(mode="json"), chunks, rid)
        except BackPressureError as e:
            retry = self.cfg.serving.scorer.retry_after_s
            raise ApiError(503, "overloaded", f"scorer overloaded, retry later ({e})", {"Retry-After": str(int(retry + 0.999))}) from None
        self.metrics.answers.labels(part).inc()
        self.metrics.chunks.labels(part).inc(len(chunks))
        self.metrics.audio_seconds.labels(part).inc(result["duration_s"])
        return ScoreResponse(**result, response_id=response_id, request_id=rid,
                             latency_ms=round((time.perf_counter() - started) * 1000, 2))

    async def _guarded(self, endpoint: str, part_of, work) -> Response:
        """Run a request: count it, time it, turn errors into JSON answers."""
        rid, started = request_id(), time.perf_counter()
        part = "-"
        self.metrics.inflight.inc()
        try:
            part, body = await work(rid, started)
            status = 200
            response = JSONResponse(body)
        except ApiError as e:
            status = e.status
            # Unknown part ids come from callers: keep them out of metric labels.
            part = "unknown" if e.kind == "unknown_part" else (part_of() or part)
            self.metrics.errors.labels(e.kind, part).inc()
            logger.info("request %s refused: %s %s: %s", rid, e.status, e.kind, e.message)
            response = _error_response(e, rid)
        except Exception as e:  # an engine failure must answer, not take the replica down
            status = 500
            self.metrics.errors.labels("internal", part).inc()
            logger.exception("request %s failed", rid)
            response = _error_response(ApiError(500, "internal", f"scoring failed: {type(e).__name__}: {e}"), rid)
        finally:
            self.metrics.inflight.dec()
        self.metrics.requests.labels(endpoint, part, str(status)).inc()
        if status == 200:
            self.metrics.latency.labels(endpoint, part).observe(time.perf_counter() - started)
        return response

    # ------------------------------------------------------------ scoring

    @app.post(f"/{API_VERSION}/score", response_model=ScoreResponse, responses={
        404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 415: {"model": ErrorResponse},
        422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def score(self, request: Request) -> Response:
        """Score one answer: multipart (`part`, `audio` file, `response_id`) or JSON (`part`, `audio_base64`, `response_id`)."""
        seen: dict[str, str] = {}

        async def work(rid: str, started: float):
            self._authorize(request)
            _, audio, part, response_id = await self._read_score_request(request)
            seen["part"] = part
            result = await self._score(part, audio, response_id, rid, started)
            return part, result.model_dump()

        return await self._guarded("score", lambda: seen.get("part"), work)

    @app.post(f"/{API_VERSION}/score/batch", response_model=BatchResponse)
    async def score_batch(self, request: Request) -> Response:
        """Score several answers of one candidate (JSON); the overall score is the mean of the answers' scores."""

        async def work(rid: str, started: float):
            self._authorize(request)
            if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                raise ApiError(415, "unsupported_media_type", "batch requests take application/json")
            try:
                batch = BatchRequest.model_validate(await request.json())
            except ValueError as e:
                msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()) if isinstance(e, ValidationError) else "body is not valid JSON"
                raise ApiError(422, "invalid_request", msg) from None
            audios = [_b64(a.audio_base64) for a in batch.answers]
            for a in audios:
                self._check_size(len(a))

            async def one(i: int):
                a = batch.answers[i]
                try:
                    return await self._score(a.part, audios[i], a.response_id, rid, started)
                except ApiError as e:
                    raise ApiError(e.status, e.kind, f"answers[{i}] ({a.part}): {e.message}", e.headers) from None

            results = await asyncio.gather(*(one(i) for i in range(len(audios))))
            mean = sum(r.score for r in results) / len(results)
            levels = self.registry.get(results[0].part).config.levels
            body = BatchResponse(
                candidate_id=batch.candidate_id, results=results,
                overall=Overall(score=mean, cefr=nearest_level(levels, mean).cefr),
                request_id=rid, latency_ms=round((time.perf_counter() - started) * 1000, 2),
            )
            return "batch", body.model_dump()

        return await self._guarded("score_batch", lambda: None, work)

    # ------------------------------------------------------------ parts (admin)

    def _part_info(self, entry) -> PartInfo:
        return PartInfo(
            part=entry.part, model_id=entry.model_id,
            adapter=None if entry.config.adapter is None else str(entry.config.adapter),
            adapter_hash=entry.adapter_hash, task=entry.config.task,
            labels={lv.label: lv.score for lv in entry.config.levels},
        )

    @app.get(f"/{API_VERSION}/parts", response_model=PartsResponse)
    async def list_parts(self, request: Request) -> Response:
        """The exam parts this service scores."""

        async def work(rid, started):
            self._authorize(request)
            parts = [self._part_info(e).model_dump() for e in self.registry.entries().values()]
            return "-", {"parts": parts}

        return await self._guarded("parts", lambda: None, work)

    @app.put(f"/{API_VERSION}/parts/{{part}}", response_model=PartInfo)
    async def put_part(self, part: str, request: Request) -> Response:
        """Register or replace a part's adapter (admin). Takes effect at once; persisted across restarts."""

        async def work(rid, started):
            self._authorize(request, admin=True)
            if not part or not all(c.isalnum() or c in "-_." for c in part):
                raise ApiError(422, "invalid_request", "part ids are letters, digits, '-', '_' or '.'")
            try:
                body = PutPartRequest.model_validate(await request.json())
            except ValidationError as e:
                raise ApiError(422, "invalid_request", "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
            except ValueError:
                raise ApiError(422, "invalid_request", "body is not valid JSON") from None
            try:
                entry = self.registry.validate(part, body)
                await self.scorer.check_part.remote(part, body.model_dump(mode="json"))
                entry = self.registry.put(part, body)
            except ValueError as e:
                raise ApiError(422, "invalid_adapter", str(e)) from None
            logger.info("request %s: part %s registered as %s", rid, part, entry.model_id)
            return part, self._part_info(entry).model_dump()

        return await self._guarded("put_part", lambda: part, work)

    @app.delete(f"/{API_VERSION}/parts/{{part}}")
    async def delete_part(self, part: str, request: Request) -> Response:
        """Remove a part (admin). Requests already in flight finish; new ones get 404."""

        async def work(rid, started):
            self._authorize(request, admin=True)
            try:
                self.registry.delete(part)
            except UnknownPartError as e:
                raise ApiError(404, "unknown_part", str(e)) from None
            logger.info("request %s: part %s removed", rid, part)
            return part, {"deleted": part}

        return await self._guarded("delete_part", lambda: part, work)

    # ------------------------------------------------------------ operations

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """The ingress process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> Response:
        """The scorer's engine is loaded and its label tokens checked."""
        try:
            await asyncio.wait_for(self.scorer.ready.remote(), timeout=5)
        except Exception as e:
            return JSONResponse({"ready": False, "reason": f"{type(e).__name__}: {e}"}, status_code=503)
        return JSONResponse({"ready": True, "untrained": self.cfg.model.untrained, "base_model": self.cfg.model.base})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """Prometheus metrics of this ingress replica, plus adapter loads/evictions of a scorer replica."""
        try:
            self.metrics.set_scorer_stats(await asyncio.wait_for(self.scorer.get_stats.remote(), timeout=5))
        except Exception:
            pass
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")
