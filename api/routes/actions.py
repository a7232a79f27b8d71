"""Staff actions on one job (technologists and admins): retry, cancel, change priority
(:class:`reconq.scheduler.actions.Actions`; their refusals are answered by :mod:`reconq.api.problems`)."""

from __future__ import annotations

from fastapi import APIRouter

from reconq.api.deps import ActionsDep, JobId, TechnologistDep
from reconq.api.problems import ACTION_ERRORS
from reconq.api.schemas import JobOut, PriorityChange

router = APIRouter(prefix="/api/jobs", tags=["actions"], responses=ACTION_ERRORS)


@router.post("/{job_id}/retry", response_model=JobOut, summary="Queue a failed job again")
def retry_job(job_id: JobId, actions: ActionsDep, who: TechnologistDep) -> JobOut:
    return JobOut.of(actions.retry(job_id, who.name), who.staff)


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job")
def cancel_job(job_id: JobId, actions: ActionsDep, who: TechnologistDep) -> JobOut:
    return JobOut.of(actions.cancel(job_id, who.name), who.staff)


@router.post("/{job_id}/priority", response_model=JobOut, summary="Move a queued job to another queue")
def change_priority(job_id: JobId, body: PriorityChange, actions: ActionsDep, who: TechnologistDep) -> JobOut:
    return JobOut.of(actions.set_priority(job_id, body.queue, who.name), who.staff)
