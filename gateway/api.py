"""The HTTP API (FastAPI): jobs, their images, health.

Built by :func:`make_api` from the settings and a Redis client, so tests need no monkeypatching.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from reconq.constants import JobState
from reconq.jobs import JobStore
from reconq.settings import Settings


class JobOut(BaseModel):
    id: str
    scan_id: str
    pipeline: str
    params: dict[str, Any]
    state: JobState
    queue: str
    progress: float
    stage: str
    attempts: int
    created_at: float
    queued_at: float | None
    started_at: float | None
    finished_at: float | None
    worker: str
    gpu: str
    error: str
    protocol: str
    measurement_id: str
    has_images: bool


class JobPage(BaseModel):
    total: int
    offset: int
    limit: int
    jobs: list[JobOut]


class Health(BaseModel):
    status: str
    redis: bool


def get_store(request: Request) -> JobStore:
    return request.app.state.jobs


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


StoreDep = Annotated[JobStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

jobs_router = APIRouter(prefix="/api/jobs", tags=["jobs"])
health_router = APIRouter(tags=["health"])


def job_out(job: Any) -> JobOut:
    data = job.public()
    data["has_images"] = job.state is JobState.DONE and bool(job.result_path)
    return JobOut.model_validate(data)


@jobs_router.get("", response_model=JobPage, summary="Jobs, newest first")
def list_jobs(
    store: StoreDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    state: JobState | None = None,
) -> JobPage:
    jobs = store.list(offset=offset, limit=limit, state=state)
    return JobPage(total=store.count(), offset=offset, limit=limit, jobs=[job_out(j) for j in jobs])


@jobs_router.get("/{job_id}", response_model=JobOut, summary="One job")
def get_job(job_id: str, store: StoreDep) -> JobOut:
    job = store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job_out(job)


@jobs_router.get("/{job_id}/images", response_class=FileResponse, summary="The job's result MRD file")
def get_job_images(job_id: str, store: StoreDep) -> FileResponse:
    job = store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    if job.state is not JobState.DONE or not job.result_path or not Path(job.result_path).is_file():
        raise HTTPException(409, f"job {job_id} has no images (state {job.state.value})")
    return FileResponse(job.result_path, media_type="application/x-hdf5", filename=f"{job_id}.h5")


@health_router.get("/api/health", response_model=Health, summary="Liveness and Redis reachability")
def health(store: StoreDep) -> Health:
    try:
        ok = bool(store.redis.ping())
    except redis.RedisError:
        ok = False
    return Health(status="ok" if ok else "degraded", redis=ok)


def make_api(settings: Settings, client: redis.Redis) -> FastAPI:
    app = FastAPI(title="ReconQ", version="0.1.0", description="Asynchronous inline MRI reconstruction")
    app.state.settings = settings
    app.state.jobs = JobStore(client)
    app.include_router(jobs_router)
    app.include_router(health_router)
    return app
