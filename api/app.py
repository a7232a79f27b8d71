"""The HTTP API (FastAPI) and the technologists' dashboard it serves.

Routes: jobs (paged, filtered), one job with its log, stage timings, staff actions and previews; result
downloads (MRD, DICOM); staff actions (retry, cancel, priority, retro-recon); queues, retrievals,
pipelines; live job events (server-sent events from Redis pub/sub); ``/metrics``; the dashboard pages.
Built by :func:`create_api` from services made once (:func:`reconq.services.make_api`), so tests need no
monkeypatching.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Annotated

import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from typing_extensions import TypeAliasType

from reconq.api import exports, metrics
from reconq.api.auth import Principal, StaffDep, ViewerDep, auth_router, check_auth_settings
from reconq.api.gpus import gpus_router
from reconq.api.problems import Problem, ValidationProblem
from reconq.core.constants import EVENTS_CHANNEL, Queue
from reconq.core.jobs import Job, JobStore
from reconq.core.settings import Settings
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.scheduler.actions import ActionError, Actions
from reconq.scheduler.monitor import cluster_status

log = logging.getLogger(__name__)

DASHBOARD = Path(__file__).with_name("dashboard")
#: Seconds between keep-alive comments on the event stream (proxies drop silent connections).
SSE_KEEPALIVE_S = 15.0


#: A pipeline parameter: JSON, spelled out so that the OpenAPI description says what it may hold.
Param = TypeAliasType("Param", "str | int | float | bool | None | list[Param] | dict[str, Param]")
BINARY = {"schema": {"type": "string", "format": "binary"}}
TEXT = {"schema": {"type": "string"}}


class JobOut(BaseModel):
    """One job as listed. ``patient`` is masked unless the viewer is signed in as staff."""

    id: str
    scan_id: str
    pipeline: str
    params: dict[str, Param]
    state: JobState
    queue: str
    progress: float = Field(ge=0, le=1)
    stage: str
    attempts: int
    created_at: float = Field(description="Epoch seconds")
    queued_at: float | None
    started_at: float | None
    finished_at: float | None
    run_time_s: float | None = Field(description="Seconds running: to the finish, or until now")
    memory_estimate_gb: float | None = Field(description="GPU memory the scheduler reserves for it; null: not "
                                                         "estimated yet")
    expected_run_time_s: float | None = Field(description="Its expected run time; null: not known")
    worker: str
    gpu: str
    error: str
    protocol: str
    measurement_id: str
    patient: str = Field(description="Patient ID; masked for viewers who are not signed in as staff")
    has_images: bool


class StageTiming(BaseModel):
    stage: str
    started_at: float
    seconds: float


class ActionRecord(BaseModel):
    at: float
    who: str
    action: str
    detail: str


class JobDetail(JobOut):
    """One job with everything the job page shows."""

    log: list[str]
    stages: list[StageTiming]
    actions: list[ActionRecord]
    previews: list[int] = Field(description="Indexes of the images with a PNG preview")
    image_count: int


class JobPage(BaseModel):
    total: int = Field(description="Jobs matching the filters")
    offset: int
    limit: int
    jobs: list[JobOut]


class Health(BaseModel):
    status: str
    redis: bool


class QueueDepth(BaseModel):
    name: Queue
    depth: int


class RetrievalRate(BaseModel):
    found: int
    not_found: int
    rate: float | None = Field(description="found / all; null when there were none")


class Retrievals(BaseModel):
    day: RetrievalRate
    week: RetrievalRate


class PriorityChange(BaseModel):
    queue: Queue = Field(description="stat (first), routine or bulk (last)")


class RetroRecon(BaseModel):
    pipeline: str = Field(min_length=1, max_length=100)
    params: dict[str, Param] | None = Field(None, description="Pipeline parameters; null: the scan's own")
    queue: Queue = Queue.BULK


class RetroBatch(RetroRecon):
    scan_ids: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=1000, description="The stored scans; one job each, placed as one batch")


def get_store(request: Request) -> JobStore:
    return request.app.state.jobs


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_actions(request: Request) -> Actions:
    return request.app.state.actions


StoreDep = Annotated[JobStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ActionsDep = Annotated[Actions, Depends(get_actions)]
JobId = Annotated[str, PathParam(min_length=1, max_length=200)]

ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": Problem, "description": "Not signed in"},
    404: {"model": Problem, "description": "No such job"},
    422: {"model": ValidationProblem, "description": "Invalid parameters"}}
ACTION_ERRORS: dict[int | str, dict[str, object]] = {
    **ERRORS, 403: {"model": Problem, "description": "Missing action header"},
    409: {"model": Problem, "description": "Not possible in the job's state"}}

jobs_router = APIRouter(prefix="/api/jobs", tags=["jobs"])
actions_router = APIRouter(prefix="/api", tags=["actions"])
status_router = APIRouter(prefix="/api", tags=["status"])
pages_router = APIRouter(include_in_schema=False)


def mask(patient_id: str) -> str:
    """A patient ID as anonymous viewers see it: first and last character only."""
    if len(patient_id) <= 2:
        return "*" * len(patient_id)
    return patient_id[0] + "*" * (len(patient_id) - 2) + patient_id[-1]


def run_time(job: Job, now: float) -> float | None:
    if job.started_at is None:
        return None
    end = job.finished_at if job.finished_at is not None else (now if job.state is JobState.RUNNING else None)
    return None if end is None else max(0.0, end - job.started_at)


def job_out(job: Job, who: Principal, now: float | None = None) -> JobOut:
    data = job.public()
    data["has_images"] = job.state is JobState.DONE and bool(job.result_path)
    data["patient"] = job.patient_id if who.staff else mask(job.patient_id)
    data["run_time_s"] = run_time(job, time.time() if now is None else now)
    data["memory_estimate_gb"] = round(job.mem_estimate_bytes / 1e9, 2) if job.mem_estimate_bytes else None
    data["expected_run_time_s"] = job.runtime_estimate_s or None
    return JobOut.model_validate(data)


def stage_timings(lines: list[str], job: Job) -> list[StageTiming]:
    """Per stage, when it began and how long it lasted, from the ``stage <name>`` lines of the job's log."""
    marks: list[tuple[str, float]] = []
    for line in lines:
        stamp, _, text = line.partition(" ")
        if not (text.startswith("stage ") or text.startswith("state ")):
            continue
        try:
            at = time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            continue
        if text.startswith("stage "):
            marks.append((text[6:], at))
        elif marks and text.split(":")[0][6:] in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
            marks.append(("", at))
    end = job.finished_at or time.time()
    out = []
    for (stage, at), (_, nxt) in zip(marks, [*marks[1:], ("", end)], strict=False):
        if stage:
            out.append(StageTiming(stage=stage, started_at=at, seconds=max(0.0, nxt - at)))
    return out


def _job_or_404(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


def _result_or_409(job: Job) -> Path:
    if job.state is not JobState.DONE or not job.result_path or not Path(job.result_path).is_file():
        raise HTTPException(409, f"job {job.id} has no images (state {job.state.value})")
    return Path(job.result_path)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


@jobs_router.get("", response_model=JobPage, summary="Jobs, newest first, filtered", responses=ERRORS)
def list_jobs(
    store: StoreDep,
    who: ViewerDep,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    state: JobState | None = None,
    protocol: Annotated[str, Query(max_length=200, description="Substring of the protocol name")] = "",
    since: Annotated[datetime | None, Query(description="Created at or after (ISO date or time)")] = None,
    until: Annotated[datetime | None, Query(description="Created before (ISO date or time)")] = None,
) -> JobPage:
    lo, hi = _epoch(since), _epoch(until)
    if lo is not None and hi is not None and lo >= hi:
        raise HTTPException(422, "`since` must be before `until`")
    jobs, total = store.query(offset, limit, state, protocol, lo, hi)
    now = time.time()
    return JobPage(total=total, offset=offset, limit=limit, jobs=[job_out(j, who, now) for j in jobs])


@jobs_router.get("/{job_id}", response_model=JobDetail, summary="One job, with its log, stages and actions",
                 responses=ERRORS)
def get_job(job_id: JobId, store: StoreDep, who: ViewerDep) -> JobDetail:
    job = _job_or_404(store, job_id)
    lines = store.log_lines(job_id)
    count = 0
    if job.state is JobState.DONE and job.result_path and Path(job.result_path).is_file():
        count = exports.count_images(Path(job.result_path))
    return JobDetail(**job_out(job, who).model_dump(), log=lines, stages=stage_timings(lines, job),
                     actions=[ActionRecord(**a) for a in store.actions(job_id)],
                     previews=exports.preview_indexes(count), image_count=count)


@jobs_router.get("/{job_id}/images", response_class=FileResponse, summary="The result MRD file (staff)",
                 responses={**ERRORS, 200: {"content": {"application/x-hdf5": BINARY}},
                            409: {"model": Problem, "description": "No images yet"}})
def get_job_images(job_id: JobId, store: StoreDep, who: StaffDep) -> FileResponse:
    path = _result_or_409(_job_or_404(store, job_id))
    return FileResponse(path, media_type="application/x-hdf5", filename=f"{job_id}.h5")


@jobs_router.get("/{job_id}/dicom", response_class=Response, summary="The result as DICOM files in a zip (staff)",
                 responses={**ERRORS, 200: {"content": {"application/zip": BINARY}},
                            409: {"model": Problem, "description": "No images yet"}})
def get_job_dicom(job_id: JobId, store: StoreDep, who: StaffDep) -> Response:
    job = _job_or_404(store, job_id)
    data = exports.dicom_zip(_result_or_409(job), job.id, f"{job.protocol} {job.pipeline} ReconQ".strip())
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{job_id}-dicom.zip"'})


@jobs_router.get("/{job_id}/previews/{index}.png", response_class=Response, summary="PNG preview of one image",
                 responses={**ERRORS, 200: {"content": {"image/png": BINARY}},
                            409: {"model": Problem, "description": "No images yet"}})
def get_preview(job_id: JobId, index: Annotated[int, PathParam(ge=0)], store: StoreDep, who: ViewerDep) -> Response:
    path = _result_or_409(_job_or_404(store, job_id))
    try:
        png = exports.preview_png(path, index)
    except IndexError as e:
        raise HTTPException(404, str(e)) from e
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@actions_router.post("/jobs/{job_id}/retry", response_model=JobOut, summary="Queue a failed job again",
                     responses=ACTION_ERRORS)
def retry_job(job_id: JobId, actions: ActionsDep, who: StaffDep) -> JobOut:
    return job_out(actions.retry(job_id, who.name), who)


@actions_router.post("/jobs/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job",
                     responses=ACTION_ERRORS)
def cancel_job(job_id: JobId, actions: ActionsDep, who: StaffDep) -> JobOut:
    return job_out(actions.cancel(job_id, who.name), who)


@actions_router.post("/jobs/{job_id}/priority", response_model=JobOut, summary="Move a queued job to another queue",
                     responses=ACTION_ERRORS)
def change_priority(job_id: JobId, body: PriorityChange, actions: ActionsDep, who: StaffDep) -> JobOut:
    return job_out(actions.set_priority(job_id, body.queue, who.name), who)


@actions_router.post("/scans/{scan_id}/jobs", response_model=JobOut, status_code=201,
                     summary="Retro-recon: a new job on a stored scan", responses={
                         **ACTION_ERRORS, 404: {"model": Problem, "description": "No such scan"},
                         422: {"model": Problem, "description": "Unknown pipeline"}})
def retro_recon(scan_id: Annotated[str, PathParam(min_length=1, max_length=200)], actions: ActionsDep,
                who: StaffDep, body: Annotated[RetroRecon, Body()]) -> JobOut:
    return job_out(actions.retro_recon(scan_id, body.pipeline, body.params, body.queue, who.name), who)


@actions_router.post("/retro", response_model=list[JobOut], status_code=201,
                     summary="Retro-recon of several scans as one batch (all checked first; placed together)",
                     responses={**ACTION_ERRORS, 404: {"model": Problem, "description": "No such scan"},
                                422: {"model": Problem, "description": "Unknown pipeline"}})
def retro_recon_batch(actions: ActionsDep, who: StaffDep, body: Annotated[RetroBatch, Body()]) -> list[JobOut]:
    jobs = actions.retro_recon_many(body.scan_ids, body.pipeline, body.params, body.queue, who.name)
    return [job_out(job, who) for job in jobs]


@status_router.get("/queues", response_model=list[QueueDepth], summary="Messages waiting per queue",
                   responses=ERRORS)
def queues(store: StoreDep, who: ViewerDep) -> list[QueueDepth]:
    return [QueueDepth(name=Queue(q), depth=n) for q, n in metrics.queue_depths(store).items()]


def _rate(store: JobStore, since: float) -> RetrievalRate:
    found, missed = store.retrieval_counts(since)
    return RetrievalRate(found=found, not_found=missed, rate=found / (found + missed) if found + missed else None)


@status_router.get("/retrievals", response_model=Retrievals, summary="Retrieval scans that found their images",
                   responses=ERRORS)
def retrievals(store: StoreDep, who: ViewerDep) -> Retrievals:
    now = time.time()
    return Retrievals(day=_rate(store, now - 86400), week=_rate(store, now - 7 * 86400))


@status_router.get("/pipelines", response_model=list[str], summary="Pipelines a retro-recon may use",
                   responses=ERRORS)
def pipelines(actions: ActionsDep, who: ViewerDep) -> list[str]:
    return sorted(actions.pipelines)


@status_router.get("/health", response_model=Health, summary="Liveness and Redis reachability")
def health(store: StoreDep) -> Health:
    try:
        ok = bool(store.redis.ping())
    except redis.RedisError:
        ok = False
    return Health(status="ok" if ok else "degraded", redis=ok)


async def _event_stream(request: Request) -> AsyncIterator[str]:
    client = aioredis.Redis.from_url(request.app.state.redis_url, decode_responses=True)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(EVENTS_CHANNEL)
        yield "retry: 2000\nevent: hello\ndata: {}\n\n"
        quiet_since = time.monotonic()
        while not await request.is_disconnected():
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None:
                yield f"data: {msg['data']}\n\n"
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
    except (redis.RedisError, OSError) as e:
        log.warning("event stream ends: Redis: %s", e)
    finally:
        await pubsub.aclose()
        await client.aclose()


@status_router.get("/events", response_class=StreamingResponse, summary="Job changes as server-sent events",
                   responses={**ERRORS, 200: {"content": {"text/event-stream": TEXT},
                                              "description": "`data:` JSON {id, state?, progress?, stage?, "
                                                             "action?} per change"}})
async def events(request: Request, who: ViewerDep) -> StreamingResponse:
    return StreamingResponse(_event_stream(request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


metrics_router = APIRouter(tags=["metrics"])


@metrics_router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics",
                    responses={200: {"content": {"text/plain": TEXT}}})
async def prometheus(request: Request) -> PlainTextResponse:
    settings, store = request.app.state.settings, request.app.state.jobs

    def scrape() -> str:
        gpus = cluster_status(store.redis, forget_s=settings.gpu_forget_s).gpus
        return metrics.render(store, gpus)

    text = await asyncio.to_thread(scrape)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


@pages_router.get("/")
def index_page() -> FileResponse:
    return FileResponse(DASHBOARD / "index.html")


@pages_router.get("/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    return FileResponse(DASHBOARD / "job.html")


def _redis_url(settings: Settings, client: redis.Redis) -> str:
    if settings.redis_url:
        return settings.redis_url
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


async def _action_error(request: Request, exc: Exception) -> JSONResponse:
    """A refused staff action: its HTTP status and the message saying why (``detail``)."""
    assert isinstance(exc, ActionError)
    return JSONResponse({"detail": exc.message}, status_code=exc.status)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with one readable message (``detail``) and the field errors (``errors``)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', '')}" for e in errors]
    return JSONResponse({"detail": "; ".join(parts) or "invalid request",
                         "errors": [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors]},
                        status_code=422)


def create_api(settings: Settings, jobs: JobStore, scans: ScanStore, actions: Actions) -> FastAPI:
    """The API on these services (built by :func:`reconq.services.make_api`)."""
    check_auth_settings(settings)
    app = FastAPI(title="ReconQ", version="0.1.0", description="Asynchronous inline MRI reconstruction: "
                  "jobs, staff actions, live events and the technologists' dashboard")
    app.state.settings = settings
    app.state.jobs = jobs
    app.state.scans = scans
    app.state.redis_url = _redis_url(settings, jobs.redis)
    app.state.actions = actions
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ActionError, _action_error)
    app.include_router(jobs_router)
    app.include_router(actions_router)
    app.include_router(status_router)
    app.include_router(auth_router, responses={422: ERRORS[422], 401: ERRORS[401]})
    app.include_router(metrics_router)
    app.include_router(pages_router)
    app.include_router(gpus_router)
    app.mount("/static", StaticFiles(directory=DASHBOARD / "static"), name="static")
    return app
