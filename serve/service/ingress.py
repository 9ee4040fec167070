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
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve.grading.audio import AudioError, Chunk, prepare_answer
from serve.grading.config import PART_ID_CHARS, UnknownPartError, load_config, validate_part_id
from serve.grading.parts import Part
from serve.grading.scoring import overall
from serve.service.auth import ApiKeys, require_admin, require_user, use_keys
from serve.service.errors import ApiError, install_error_handlers, request_id
from serve.service.metrics import METRICS, RequestMetrics
from serve.service.openapi import BATCH_BODY, PUT_PART_BODY, SCORE_BODY, errors
from serve.service.page import router as page_router
from serve.service.protocol import (
    BatchResponse,
    Overall,
    PartInfo,
    PartsResponse,
    PutPartRequest,
    ScoreResponse,
)
from serve.service.registry import PartRegistry
from serve.service.uploads import ScoreUpload, UploadLimits, read_batch_upload, read_json, read_score_upload

logger = logging.getLogger("ray.serve")

API_VERSION = "v1"
AUDIO_STATUS = {"empty": 422, "undecodable": 422, "unreadable": 422, "unsupported_audio": 422, "silence": 422,
                "too_long": 413, "too_large": 413, "cancelled": 499}
#: Largest body of PUT /v1/parts/{part} (a path, a task text and levels).
MAX_PART_BODY = 1024 * 1024

app = FastAPI(
    title="l2-oral-grader",
    version="0.1.0",
    description="CEFR-aligned scores for spoken English answers, one exam part per answer.",
)
install_error_handlers(app)
app.add_middleware(RequestMetrics)
app.include_router(page_router)


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
        self.registry = PartRegistry.of_config(self.cfg, config_path)
        self.limits = UploadLimits(self.cfg.audio)
        self.metrics = METRICS
        s = self.cfg.serving
        self.decoder = ThreadPoolExecutor(s.decode_workers or max(1, int(s.ingress.num_cpus)), "decode")
        use_keys(ApiKeys(s))

    def _part(self, name: str) -> Part:
        try:
            return self.registry.get(name)
        except UnknownPartError as e:
            raise ApiError(404, "unknown_part", str(e)) from None

    async def _prepare(self, upload: ScoreUpload) -> list[Chunk]:
        """Decode, check and chunk one answer in the bounded decoding pool; stops if the request is cancelled."""
        stop = threading.Event()
        t0 = time.perf_counter()
        job = asyncio.get_running_loop().run_in_executor(
            self.decoder, functools.partial(prepare_answer, upload.audio, self.cfg.audio, stop.is_set))
        try:
            chunks = await job
        except asyncio.CancelledError:  # the client went away: free the decoder
            stop.set()
            logger.info("request %s cancelled: its decoding stops", request_id())
            raise
        except AudioError as e:
            raise ApiError(AUDIO_STATUS.get(e.kind, 422), e.kind, str(e)) from None
        self.metrics.decode.observe(time.perf_counter() - t0)
        return chunks

    async def _score(self, upload: ScoreUpload, started: float, chunks: list[Chunk] | None = None) -> ScoreResponse:
        """Have the scorer replica that holds the answer's part score it (decoding it first unless done)."""
        part = self._part(upload.part)
        if chunks is None:
            chunks = await self._prepare(upload)
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

    @app.post(f"/{API_VERSION}/score", name="score", response_model=ScoreResponse, openapi_extra=SCORE_BODY,
              responses=errors(401, 404, 413, 415, 422, 500, 503), dependencies=[Depends(require_user)])
    async def post_score(self, request: Request) -> ScoreResponse:
        """Score one answer: multipart (`part`, `audio` file, `response_id`) or JSON (`part`, `audio_base64`, `response_id`)."""
        started = time.perf_counter()
        upload = await read_score_upload(request, self.limits)
        request.state.part = upload.part if upload.part in self.registry.entries() else "unknown"
        return await self._score(upload, started)

    @app.post(f"/{API_VERSION}/score/batch", name="score_batch", response_model=BatchResponse, openapi_extra=BATCH_BODY,
              responses=errors(401, 404, 413, 415, 422, 500, 503), dependencies=[Depends(require_user)])
    async def post_score_batch(self, request: Request) -> BatchResponse:
        """Score several answers of one candidate (JSON); the overall score is the mean of the answers' scores."""
        started = time.perf_counter()
        batch, uploads = await read_batch_upload(request, self.limits)
        request.state.part = "batch"
        audio = self.cfg.audio

        async def each(i: int, upload: ScoreUpload, step):
            try:
                return await step(upload)
            except ApiError as e:
                raise ApiError(e.status, e.kind, f"answers[{i}] ({upload.part[:64]}): {e.message}", e.headers) from None

        async def known(upload: ScoreUpload) -> Part:
            return self._part(upload.part)

        for i, upload in enumerate(uploads):  # an unknown part is refused before any decoding
            await each(i, upload, known)
        chunks = await asyncio.gather(*(each(i, u, self._prepare) for i, u in enumerate(uploads)))
        total_s = sum(c[-1].end_s for c in chunks)
        if total_s > audio.max_batch_audio_s:
            raise ApiError(413, "too_long",
                           f"the batch holds {total_s:.0f} s of audio: at most {audio.max_batch_audio_s:g} s in one batch")
        results = await asyncio.gather(*(
            each(i, u, functools.partial(self._score, started=started, chunks=c))
            for i, (u, c) in enumerate(zip(uploads, chunks))))
        mean, cefr = overall([r.score for r in results], self.registry.get(results[0].part).config.levels)
        return BatchResponse(
            candidate_id=batch.candidate_id, results=results,
            overall=Overall(score=mean, cefr=cefr),
            request_id=request_id(), latency_ms=elapsed_ms(started),
        )

    # ------------------------------------------------------------ parts (admin)

    @app.get(f"/{API_VERSION}/parts", name="list_parts", response_model=PartsResponse, responses=errors(401, 500),
             dependencies=[Depends(require_user)])
    async def list_parts(self) -> PartsResponse:
        """The exam parts this service scores."""
        return PartsResponse(parts=[part_info(p) for p in self.registry.entries().values()])

    @app.put(f"/{API_VERSION}/parts/{{part}}", name="put_part", response_model=PartInfo,
             responses=errors(401, 403, 413, 415, 422, 500), openapi_extra=PUT_PART_BODY,
             dependencies=[Depends(require_admin)])
    async def put_part(self, request: Request, part: str = Depends(part_path)) -> PartInfo:
        """Register or replace a part's adapter (admin). Takes effect at once; persisted across restarts."""
        body = await read_json(request, PutPartRequest, MAX_PART_BODY, json_type_required=False)
        try:
            checked = await asyncio.to_thread(self.registry.check, part, body)  # hashing may take a while
            await self.scorer.check_labels.remote(checked)
        except ValueError as e:
            raise ApiError(422, "invalid_adapter", str(e)) from None
        self.registry.put(checked)
        logger.info("request %s: part %s registered as %s", request_id(), part, checked.model_id)
        return part_info(checked)

    @app.delete(f"/{API_VERSION}/parts/{{part}}", name="delete_part", responses=errors(401, 403, 404, 422, 500),
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

    @app.get("/readyz", responses={503: {"description": "The scorer is not ready (yet)."}})
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
