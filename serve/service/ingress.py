"""The Ingress replica: the HTTP API's routes (FastAPI on Ray Serve).

Routes stay thin: authentication is a dependency (:mod:`serve.service.auth`),
bodies are parsed by :mod:`serve.service.uploads`, errors are answered by the
handlers of :mod:`serve.service.errors`, and every request is counted once by
:class:`serve.service.metrics.RequestMetrics`. A route decodes and checks the
audio (in a worker thread, so decoding never blocks the event loop), cuts it
into chunks and forwards them to the Scorer deployment under the part's model
id, which Ray Serve's multiplexing uses to pick a replica that already holds
the part's adapter. The ingress scales separately from the scorer, so audio
decoding never starves the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve.grading.audio import AudioError, prepare_answer
from serve.grading.config import PART_ID_CHARS, UnknownPartError, load_config, validate_part_id
from serve.grading.levels import nearest_level
from serve.grading.parts import Part
from serve.service.auth import ApiKeys, require_admin, require_user, use_keys
from serve.service.errors import ApiError, install_error_handlers, request_id
from serve.service.metrics import METRICS, RequestMetrics
from serve.service.protocol import (
    BatchResponse,
    ErrorResponse,
    Overall,
    PartInfo,
    PartsResponse,
    PutPartRequest,
    ScoreResponse,
)
from serve.service.registry import PartRegistry, default_registry_file
from serve.service.uploads import ScoreUpload, UploadLimits, read_batch_upload, read_json, read_score_upload

logger = logging.getLogger("ray.serve")

API_VERSION = "v1"
AUDIO_STATUS = {"empty": 422, "undecodable": 422, "unreadable": 422, "silence": 422, "too_long": 413}
ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 413, 415, 422, 503)}

app = FastAPI(
    title="l2-oral-grader",
    version="0.1.0",
    description="CEFR-aligned scores for spoken English answers, one exam part per answer.",
)
install_error_handlers(app)
app.add_middleware(RequestMetrics)


def part_path(request: Request, part: str) -> str:
    """Dependency: the ``{part}`` of the URL, under the one part-id rule."""
    try:
        validate_part_id(part)
    except ValueError:
        raise ApiError(422, "invalid_request", f"part ids are {PART_ID_CHARS}") from None
    request.state.part = part
    return part


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def part_info(part: Part) -> PartInfo:
    return PartInfo(
        part=part.part, model_id=part.model_id,
        adapter=None if part.config.adapter is None else str(part.config.adapter),
        adapter_hash=part.adapter_hash, task=part.config.task,
        labels={lv.label: lv.score for lv in part.config.levels},
    )


class Ingress:
    """HTTP front of the grader (:func:`serve.service.app.build_app` makes it a Serve deployment)."""

    def __init__(self, scorer: DeploymentHandle, config_path: str):
        self.cfg = load_config(config_path)
        self.scorer = scorer
        self.registry = PartRegistry(self.cfg, Path(self.cfg.serving.registry_file or default_registry_file(config_path)))
        self.limits = UploadLimits(self.cfg.audio.max_upload_mb)
        self.metrics = METRICS
        use_keys(ApiKeys(self.cfg.serving))

    async def _score(self, upload: ScoreUpload, started: float) -> ScoreResponse:
        """Decode, check and chunk one answer and have the scorer replica that holds its part score it."""
        try:
            part = self.registry.get(upload.part)
        except UnknownPartError as e:
            raise ApiError(404, "unknown_part", str(e)) from None
        t0 = time.perf_counter()
        try:
            chunks = await asyncio.to_thread(prepare_answer, upload.audio, self.cfg.audio)
        except AudioError as e:
            raise ApiError(AUDIO_STATUS.get(e.kind, 422), e.kind, str(e)) from None
        self.metrics.decode.observe(time.perf_counter() - t0)
        handle = self.scorer.options(multiplexed_model_id=part.model_id)
        try:
            result = await handle.score_chunks.remote(chunks, request_id())
        except BackPressureError as e:
            retry = str(int(self.cfg.serving.scorer.retry_after_s + 0.999))
            raise ApiError(503, "overloaded", f"scorer overloaded, retry later ({e})", {"Retry-After": retry}) from None
        self.metrics.record_answer(upload.part, len(chunks), result["duration_s"])
        return ScoreResponse(**result, response_id=upload.response_id, request_id=request_id(),
                             latency_ms=elapsed_ms(started))

    # ------------------------------------------------------------ scoring

    @app.post(f"/{API_VERSION}/score", name="score", response_model=ScoreResponse, responses=ERRORS,
              dependencies=[Depends(require_user)])
    async def post_score(self, request: Request) -> ScoreResponse:
        """Score one answer: multipart (`part`, `audio` file, `response_id`) or JSON (`part`, `audio_base64`, `response_id`)."""
        started = time.perf_counter()
        upload = await read_score_upload(request, self.limits)
        request.state.part = upload.part if upload.part in self.registry.entries() else "unknown"
        return await self._score(upload, started)

    @app.post(f"/{API_VERSION}/score/batch", name="score_batch", response_model=BatchResponse, responses=ERRORS,
              dependencies=[Depends(require_user)])
    async def post_score_batch(self, request: Request) -> BatchResponse:
        """Score several answers of one candidate (JSON); the overall score is the mean of the answers' scores."""
        started = time.perf_counter()
        batch, uploads = await read_batch_upload(request, self.limits)
        request.state.part = "batch"

        async def one(i: int, upload: ScoreUpload) -> ScoreResponse:
            try:
                return await self._score(upload, started)
            except ApiError as e:
                raise ApiError(e.status, e.kind, f"answers[{i}] ({upload.part}): {e.message}", e.headers) from None

        results = await asyncio.gather(*(one(i, u) for i, u in enumerate(uploads)))
        mean = sum(r.score for r in results) / len(results)
        levels = self.registry.get(results[0].part).config.levels
        return BatchResponse(
            candidate_id=batch.candidate_id, results=results,
            overall=Overall(score=mean, cefr=nearest_level(levels, mean).cefr),
            request_id=request_id(), latency_ms=elapsed_ms(started),
        )

    # ------------------------------------------------------------ parts (admin)

    @app.get(f"/{API_VERSION}/parts", name="list_parts", response_model=PartsResponse, responses=ERRORS,
             dependencies=[Depends(require_user)])
    async def list_parts(self) -> PartsResponse:
        """The exam parts this service scores."""
        return PartsResponse(parts=[part_info(p) for p in self.registry.entries().values()])

    @app.put(f"/{API_VERSION}/parts/{{part}}", name="put_part", response_model=PartInfo, responses=ERRORS,
             dependencies=[Depends(require_admin)])
    async def put_part(self, request: Request, part: str = Depends(part_path)) -> PartInfo:
        """Register or replace a part's adapter (admin). Takes effect at once; persisted across restarts."""
        body = await read_json(request, PutPartRequest, json_type_required=False)
        try:
            checked = await asyncio.to_thread(self.registry.check, part, body)  # hashing may take a while
            await self.scorer.check_labels.remote(checked)
        except ValueError as e:
            raise ApiError(422, "invalid_adapter", str(e)) from None
        self.registry.put(checked)
        logger.info("request %s: part %s registered as %s", request_id(), part, checked.model_id)
        return part_info(checked)

    @app.delete(f"/{API_VERSION}/parts/{{part}}", name="delete_part", responses=ERRORS,
                dependencies=[Depends(require_admin)])
    async def delete_part(self, part: str = Depends(part_path)) -> dict:
        """Remove a part (admin). Requests already in flight finish; new ones get 404."""
        try:
            self.registry.delete(part)
        except UnknownPartError as e:
            raise ApiError(404, "unknown_part", str(e)) from None
        logger.info("request %s: part %s removed", request_id(), part)
        return {"deleted": part}

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
