"""``GET /api/gpus``: the GPUs, what runs and is reserved on each, and the jobs waiting for memory."""

from __future__ import annotations

from fastapi import APIRouter, Request

from reconq.api.auth import ViewerDep
from reconq.scheduler.monitor import ClusterOut, cluster_status

gpus_router = APIRouter(tags=["gpus"])


@gpus_router.get("/api/gpus", response_model=ClusterOut, summary="GPUs, their jobs, and jobs waiting for memory")
def get_gpus(request: Request, who: ViewerDep) -> ClusterOut:
    settings = request.app.state.settings
    return cluster_status(request.app.state.jobs.redis, forget_s=settings.gpu_forget_s)
