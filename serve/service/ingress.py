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

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from ray.serve.handle import DeploymentHandle

from serve.grading import calibration, vad
from serve.grading.adapter_files import AdapterError
from serve.grading.answers import NOT_SCORABLE_KINDS, candidate_result, failure, refusal
from serve.grading.audio import AudioError, PreparedAnswer, prepare
from serve.grading.candidate_calibration import CandidateIntervals
from serve.grading.config import PART_ID_CHARS, UnknownPartError, clip, validate_part_id
from serve.grading.parts import CalibrationRequiredError, Part, candidate_intervals_of, part_intervals
from serve.grading.results import NotScorable, ScoredAnswer
from serve.grading.review import NOT_SCORABLE
from serve.service.admission import ScoringSlots
from serve.service.auth import ApiKeys, is_admin, require_admin, require_user, use_keys
from serve.service.cluster_metrics import ClusterMetrics
from serve.service.errors import ApiError, install_error_handlers, request_id
from serve.service.metrics import RequestMetrics, ingress_metrics
from serve.service.openapi import (
    BATCH_BODY,
    METRICS_RESPONSES,
    PUT_PART_BODY,
    SCORE_JSON_BODY,
    SCORE_MULTIPART_BODY,
    errors,
)
from serve.service.page import router as page_router
from serve.service.protocol import (
    BatchResponse,
    PartInfo,
    PartsResponse,
    PutPartRequest,
    ReadyResponse,
    ScoreResponse,
)
from serve.service.routes import (
    DELETE_PART,
    HEALTHZ,
    LIST_PARTS,
    METRICS,
    PUT_PART,
    READYZ,
    SCORE,
    SCORE_BATCH,
    SCORE_JSON,
    Access,
    Route,
)
from serve.service.scorer_client import ScorerClient
from serve.service.settings import load_service_config, part_registry
from serve.service.uploads import (
    MAX_PART_BODY,
    ScoreUpload,
    UploadLimits,
    read_batch_upload,
    read_json,
    read_score_upload,
)

logger = logging.getLogger("ray.serve")

AUDIO_STATUS = {
    "empty": 422,
    "undecodable": 422,
    "unreadable": 422,
    "unsupported_audio": 422,
    "silence": 422,
    "noise": 422,
    "too_long": 413,
    "too_large": 413,
    "cancelled": 499,
}

app = FastAPIOffline(  # /docs from assets installed with the package: no CDN (ReDoc's page fetches a logo)
    title="l2-oral-grader",
    redoc_url=None,
    version="0.1.0",
    description="CEFR-aligned scores for spoken English answers, one exam part per answer.",
    generate_unique_id_function=lambda route: route.name,  # operation ids (and generated clients' names): `score`
)
install_error_handlers(app)
app.add_middleware(RequestMetrics)
app.include_router(page_router)


def route(r: Route, **kwargs):
    """FastAPI's decorator for a row of the route table (:mod:`serve.service.routes`): its method, path, operation
    name and key. The proxy guard reads the same row for the route's body limit and key."""
    key = {Access.USER: [Depends(require_user)], Access.ADMIN: [Depends(require_admin)]}.get(r.access, [])
    return app.api_route(r.path, methods=[r.method], name=r.name, dependencies=key, **kwargs)


def part_path(request: Request, part: str) -> str:
    """Dependency: the ``{part}`` of the URL, under the one part-id rule (metrics count it only if registered)."""
    try:
        validate_part_id(part)
    except ValueError:
        raise ApiError(422, "invalid_request", f"part ids are {PART_ID_CHARS}") from None
    request.state.part = part
    return part


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def part_info(part: Part, show_path: bool) -> PartInfo:
    """What callers see of a part; the adapter's path only for admins."""
    return PartInfo(
        part=part.part,
        model_id=part.model_id,
        adapter=None if part.config.adapter is None or not show_path else str(part.config.adapter),
        adapter_hash=part.adapter_hash,
        task=part.config.task,
        labels={lv.label: lv.score for lv in part.config.levels},
        aspects=list(part.config.aspects),
    )


class Ingress:
    """HTTP front of the grader (:func:`serve.service.app.build_app` makes it a Serve deployment)."""

    def __init__(self, scorer: DeploymentHandle, config_path: str):
        self.cfg = load_service_config(config_path)
        s = self.cfg.serving
        use_keys(ApiKeys(s))  # first: a named key variable that is unset stops the replica here
        self.scorer = ScorerClient(scorer, s.scorer.retry_after_s)
        self.registry = part_registry(self.cfg, config_path)
        self.limits = UploadLimits(self.cfg)
        self.slots = ScoringSlots(
            s.ingress.max_ongoing_requests, s.ingress.max_queued_requests, s.ingress.retry_after_s
        )
        self.metrics = ingress_metrics()
        self.cluster_metrics = ClusterMetrics()
        self.metrics.known_parts = self.registry.names
        self.decoder = ThreadPoolExecutor(s.decode_workers or max(1, int(s.ingress.num_cpus)), "decode")
        vad.warm_up(self.cfg.audio)  # the speech detector, before the first answer waits for it

    async def _part(self, name: str) -> Part:
        """The registered part (re-reading a changed registry, which may hash adapters, off the event loop)."""
        try:
            return await asyncio.to_thread(self.registry.get, name)
        except UnknownPartError as e:
            raise ApiError(404, "unknown_part", clip(e, 300)) from None

    async def _candidate_intervals(self, answered: dict[str, Part]) -> CandidateIntervals | None:
        """The candidate calibration checked against the rule and the parts as they serve now (the answers' parts
        as the batch scored them, the others as registered); None when the config names none."""
        if self.cfg.candidate.calibration is None:
            return None

        def check() -> CandidateIntervals:
            return candidate_intervals_of(self.cfg, {**self.registry.entries(), **answered})

        return await asyncio.to_thread(check)

    async def _prepare(self, upload: ScoreUpload) -> PreparedAnswer:
        """Decode, check, measure and chunk one answer in the bounded decoding pool (stops if the client leaves)."""
        stop = threading.Event()
        t0 = time.perf_counter()
        job = asyncio.get_running_loop().run_in_executor(
            self.decoder, functools.partial(prepare, upload.audio, self.cfg.audio, stop.is_set)
        )
        try:
            prepared = await job
        except asyncio.CancelledError:  # the client went away: free the decoder
            stop.set()
            logger.info("request %s cancelled: its decoding stops", request_id())
            raise
        except AudioError as e:
            raise ApiError(AUDIO_STATUS.get(e.kind, 422), e.kind, str(e)) from None
        self.metrics.decode.observe(time.perf_counter() - t0)
        return prepared

    async def _score(self, upload: ScoreUpload, part: Part, prepared: PreparedAnswer) -> ScoredAnswer:
        """The complete answer from the scorer replica that holds the part's adapter (one form from there on)."""
        answer = await self.scorer.score(prepared, request_id(), part)
        self.metrics.record_answer(part.part, len(prepared.chunks), answer.duration_s)
        self.metrics.record_aspects(part.part, {name: a.score for name, a in answer.aspects.items()})
        self.metrics.record_review(part.part, answer.review.reasons)
        self.metrics.record_interval(part.part, answer.interval_status, answer.interval and answer.interval.width)
        return answer

    # ------------------------------------------------------------ scoring

    @route(
        SCORE,
        response_model=ScoreResponse,
        openapi_extra=SCORE_MULTIPART_BODY,
        responses=errors(401, 404, 413, 415, 422, 500, 503),
    )
    async def post_score(self, request: Request) -> ScoreResponse:
        """Score one answer: multipart (`part`, `audio` file, `response_id`). The JSON body of
        `POST /v1/score/json` is accepted here too."""
        started = time.perf_counter()
        upload = await read_score_upload(request, self.limits)
        request.state.part = upload.part
        part = await self._part(upload.part)  # accepted under this version, whatever happens to the part meanwhile
        async with self.slots.slot():
            answer = await self._score(upload, part, await self._prepare(upload))
        return ScoreResponse.of(answer, upload.response_id, request_id(), elapsed_ms(started))

    @route(
        SCORE_JSON,
        response_model=ScoreResponse,
        openapi_extra=SCORE_JSON_BODY,
        responses=errors(401, 404, 413, 415, 422, 500, 503),
    )
    async def post_score_json(self, request: Request) -> ScoreResponse:
        """Score one answer sent as JSON (`part`, `audio_base64` for the file, `response_id`)."""
        return await self.post_score(request)

    @route(
        SCORE_BATCH,
        response_model=BatchResponse,
        openapi_extra=BATCH_BODY,
        responses=errors(401, 404, 413, 415, 422, 500, 503),
    )
    async def post_score_batch(self, request: Request) -> BatchResponse:
        """Score several answers of one candidate (JSON). An answer that cannot be scored (silence, too little
        speech, noise or music, undecodable) gets a `not_scorable` result and the others are scored; an answer the
        grader failed to score while others were scored gets a `failed` result (`retryable`) and makes the overall
        incomplete (`complete: false`); the overall score is the mean of the scored answers'."""
        started = time.perf_counter()
        batch, uploads = await read_batch_upload(request, self.limits)
        request.state.part = "batch"
        async with self.slots.slot():
            return await self._score_batch(batch, uploads, started)

    async def _score_batch(self, batch, uploads: list[ScoreUpload], started: float) -> BatchResponse:
        async def each(i: int, upload: ScoreUpload, step):
            try:
                return await step(upload)
            except ApiError as e:
                message = f"answers[{i}] ({clip(upload.part, 64)}): {e.message}"
                raise ApiError(e.status, e.kind, message, e.headers) from None

        # Each answer's part is resolved once, before any decoding (an unknown part refuses the batch), and the
        # answer is scored under that version even if the part is replaced meanwhile.
        parts = [await each(i, u, lambda u: self._part(u.part)) for i, u in enumerate(uploads)]

        async def prepared_or_refusal(upload: ScoreUpload) -> PreparedAnswer | NotScorable:
            try:
                return await self._prepare(upload)
            except ApiError as e:
                if e.kind not in NOT_SCORABLE_KINDS:
                    raise
                self.metrics.record_review(upload.part, [NOT_SCORABLE])
                return refusal(upload.part, AudioError(e.kind, e.message), upload.response_id)

        prepared = await asyncio.gather(*(each(i, u, prepared_or_refusal) for i, u in enumerate(uploads)))
        total_s = sum(p.chunks[-1].end_s for p in prepared if isinstance(p, PreparedAnswer))
        limit_s = self.cfg.serving.max_batch_audio_s
        if total_s > limit_s:
            raise ApiError(
                413, "too_long", f"the batch holds {total_s:.0f} s of audio: at most {limit_s:g} s in one batch"
            )

        errors: list[BaseException] = []

        async def result(i: int, upload: ScoreUpload, part: Part, p: PreparedAnswer | NotScorable):
            if isinstance(p, NotScorable):
                return p
            try:
                return await each(i, upload, lambda u: self._score(u, part, p))
            except ApiError as e:
                if e.status < 500:
                    raise
                errors.append(e)
                return failure(upload.part, e.kind, e.message, upload.response_id)
            except Exception as e:
                logger.exception("request %s: answers[%d] failed in the scorer", request_id(), i)
                errors.append(e)
                message = f"the engine failed on this answer; quote request id {request_id()} when reporting it"
                return failure(upload.part, "engine_error", message, upload.response_id)

        results = await asyncio.gather(*(result(i, *args) for i, args in enumerate(zip(uploads, parts, prepared))))
        if errors and not any(isinstance(r, ScoredAnswer) for r in results):
            raise errors[0]  # nothing reached the scorer and came back: the batch as a whole failed (503: retry it)
        overall = candidate_result(
            results,
            {u.part: p.config.levels for u, p in zip(uploads, parts)},
            self.cfg.candidate,
            await self._candidate_intervals({u.part: p for u, p in zip(uploads, parts)}),
        )
        rid, latency_ms = request_id(), elapsed_ms(started)
        return BatchResponse(
            candidate_id=batch.candidate_id,
            results=[
                ScoreResponse.of(r, u.response_id, rid, latency_ms) if isinstance(r, ScoredAnswer) else r
                for r, u in zip(results, uploads)
            ],
            overall=overall,
            request_id=rid,
            latency_ms=latency_ms,
        )

    # ------------------------------------------------------------ parts (admin)

    @route(LIST_PARTS, response_model=PartsResponse, responses=errors(401, 500))
    async def list_parts(self, request: Request) -> PartsResponse:
        """The exam parts this service scores (adapter paths shown to admins only)."""
        parts = await asyncio.to_thread(self.registry.entries)
        return PartsResponse(parts=[part_info(p, is_admin(request)) for p in parts.values()])

    @route(
        PUT_PART,
        response_model=PartInfo,
        responses=errors(401, 403, 413, 415, 422, 500),
        openapi_extra=PUT_PART_BODY,
    )
    async def put_part(self, request: Request, part: str = Depends(part_path)) -> PartInfo:
        """Register or replace a part's adapter (admin). Takes effect at once; persisted across restarts."""
        body = await read_json(request, PutPartRequest, MAX_PART_BODY, json_type_required=False)
        try:
            checked = await asyncio.to_thread(self.registry.admit, part, body)  # hashing may take a while
        except AdapterError as e:
            raise ApiError(422, "invalid_adapter", clip(e, 500)) from None
        try:
            await self.scorer.check_part(checked)  # loads it and scores a canary chunk
        except ValueError as e:  # RayTaskError(ValueError) is a ValueError too
            raise ApiError(422, "invalid_adapter", clip(getattr(e, "cause", None) or e, 500)) from None
        await asyncio.to_thread(self.registry.put, checked)
        logger.info("request %s: part %s registered as %s", request_id(), part, checked.model_id)
        return part_info(checked, show_path=True)

    @route(DELETE_PART, responses=errors(401, 403, 404, 422, 500))
    async def delete_part(self, part: str = Depends(part_path)) -> dict:
        """Remove a part (admin). Requests already in flight finish; new ones get 404."""
        try:
            await asyncio.to_thread(self.registry.delete, part)
        except UnknownPartError as e:
            raise ApiError(404, "unknown_part", clip(e, 300)) from None
        logger.info("request %s: part %s removed", request_id(), part)
        return {"deleted": part}

    # ------------------------------------------------------------ operations

    @route(HEALTHZ)
    async def healthz(self) -> dict:
        """The ingress process is up."""
        return {"status": "ok"}

    @route(
        READYZ,
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "No scorer answers (yet): `reason` says why."}},
    )
    async def readyz(self, request: Request) -> Response:
        """The scorer's engine is loaded and answers (the base model's location for admins only)."""
        ready, why = await self.scorer.ready()
        if not ready:
            return JSONResponse({"ready": False, "reason": why}, status_code=503, headers=self.scorer.retry)
        body = {"ready": True, "untrained": self.cfg.model.untrained}
        states = await asyncio.to_thread(self._interval_states)
        body["intervals"] = {name: state.status for name, state in states.items()}
        if is_admin(request):
            body["base_model"] = self.cfg.model.base
            body["interval_details"] = {name: state.detail for name, state in states.items()}
        return JSONResponse(body)

    def _interval_states(self) -> dict:
        """Each registered part's calibration state, as the scorer resolves it (the file is read once per change)."""
        out = {}
        for name, part in self.registry.entries().items():
            try:
                out[name] = part_intervals(part, self.cfg, log=False).state
            except CalibrationRequiredError as e:  # the scorer refuses such a part: say so
                out[name] = calibration.CalibrationState(None, "uncalibrated", str(e))
        return out

    @route(METRICS, response_class=PlainTextResponse, responses=METRICS_RESPONSES)
    async def metrics(self) -> Response:
        """Prometheus metrics of the whole deployment: every Ray node's export of the service's, vLLM's and
        Ray Serve's metrics, merged (refreshed every few seconds)."""
        return Response(await self.cluster_metrics.page(), media_type="text/plain; version=0.0.4")
