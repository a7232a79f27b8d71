"""``GET /api/gpus``: the GPUs, what runs and is reserved on each, and the jobs waiting for memory (read
only: :func:`reconq.scheduler.monitor.cluster_status` skips stale entries and writes nothing)."""

from __future__ import annotations

from fastapi import APIRouter

from reconq.api.deps import RedisDep, SettingsDep, ViewerDep
from reconq.api.problems import VIEW_ERRORS
from reconq.api.schemas import ClusterOut
from reconq.scheduler.monitor import cluster_status

router = APIRouter(prefix="/api", tags=["gpus"])


@router.get("/gpus", response_model=ClusterOut, summary="GPUs, their jobs, and jobs waiting for memory",
            responses=VIEW_ERRORS)
def get_gpus(settings: SettingsDep, client: RedisDep, who: ViewerDep) -> ClusterOut:
    return ClusterOut.of(cluster_status(client, forget_s=settings.gpu_forget_s))
