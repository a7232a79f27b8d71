"""What the dashboard's panels and the load balancer read: queue depths, retrieval rates, the pipelines
a retro-recon may use, disk use (staff), health (503 while Redis does not answer), and the vocabulary (job
states, their transitions, the queues)."""

from __future__ import annotations

import time

import redis
from fastapi import APIRouter, HTTPException, Response

from reconq.api.deps import ActionsDep, JobStoreDep, SettingsDep, StaffDep, ViewerDep
from reconq.api.problems import VIEW_ERRORS, problem
from reconq.api.prometheus import queue_depths
from reconq.api.schemas import DiskOut, Health, QueueDepth, RetrievalRate, Retrievals, Vocabulary
from reconq.core.constants import QUEUE_ORDER, Queue
from reconq.core.diskuse import disk_usage
from reconq.core.jobs import JobStore
from reconq.core.states import CANCELLABLE, vocabulary
from reconq.scheduler.actions import REPRIORITISABLE, RETRYABLE

router = APIRouter(prefix="/api", tags=["status"])


@router.get("/queues", response_model=list[QueueDepth], summary="Messages waiting per queue",
            responses=VIEW_ERRORS)
def queues(store: JobStoreDep, who: ViewerDep) -> list[QueueDepth]:
    return [QueueDepth(name=Queue(q), depth=n) for q, n in queue_depths(store).items()]


def _rate(store: JobStore, since: float) -> RetrievalRate:
    found, missed = store.retrieval_counts(since)
    return RetrievalRate(found=found, not_found=missed, rate=found / (found + missed) if found + missed else None)


@router.get("/retrievals", response_model=Retrievals, summary="Retrieval scans that found their images",
            responses=VIEW_ERRORS)
def retrievals(store: JobStoreDep, who: ViewerDep) -> Retrievals:
    now = time.time()
    return Retrievals(day=_rate(store, now - 86400), week=_rate(store, now - 7 * 86400))


@router.get("/pipelines", response_model=list[str], summary="Pipelines a retro-recon may use",
            responses=VIEW_ERRORS)
def pipelines(actions: ActionsDep, who: ViewerDep) -> list[str]:
    return sorted(actions.pipelines)


@router.get("/vocabulary", response_model=Vocabulary,
            summary="Job states, their transitions, the queues, and the states each staff action needs",
            responses=VIEW_ERRORS)
def get_vocabulary(who: ViewerDep) -> Vocabulary:
    return Vocabulary.model_validate({
        **vocabulary(),
        "queues": [q.value for q in QUEUE_ORDER],
        "actions": {"retry": sorted(RETRYABLE), "cancel": sorted(CANCELLABLE), "priority": sorted(REPRIORITISABLE)},
    })


@router.get("/disk", response_model=DiskOut, summary="The data root's free space, raw scans and results (staff)",
            responses={**VIEW_ERRORS, 503: problem("The data dir cannot be read")})
def disk(settings: SettingsDep, who: StaffDep) -> DiskOut:
    try:
        usage = disk_usage(settings.data_dir)
    except OSError as e:
        raise HTTPException(503, f"the data dir cannot be read: {e.strerror or e}") from e
    return DiskOut.of(usage, settings.min_free_bytes)


@router.get("/health", response_model=Health, summary="Liveness and Redis reachability (503 while Redis does not "
            "answer)", responses={503: {"model": Health, "description": "Redis does not answer: "
                                        '`{"status": "degraded", "redis": false}`'}})
def health(store: JobStoreDep, response: Response) -> Health:
    try:
        ok = bool(store.redis.ping())
    except redis.RedisError:
        ok = False
    if not ok:
        response.status_code = 503
    return Health(status="ok" if ok else "degraded", redis=ok)
