"""Staff actions on one job (technologists and admins): retry, cancel, change priority
(:class:`reconq.scheduler.actions.Actions`; their refusals are answered by :mod:`reconq.api.problems`)."""

from __future__ import annotations

from fastapi import APIRouter

from reconq.api.deps import ActionsDep, AuditDep, JobId, PatientNamesDep, TechnologistDep
from reconq.api.problems import ACTION_ERRORS
from reconq.api.schemas import JobOut, PriorityChange

router = APIRouter(prefix="/api/jobs", tags=["actions"], responses=ACTION_ERRORS)


@router.post("/{job_id}/retry", response_model=JobOut, summary="Queue a failed job again")
def retry_job(job_id: JobId, actions: ActionsDep, who: TechnologistDep, audit: AuditDep,
              names: PatientNamesDep) -> JobOut:
    job = actions.retry(job_id, who.name)
    audit.noted("retry", job_id)
    return JobOut.of(job, None, patient_name=names.of_job(job))


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job")
def cancel_job(job_id: JobId, actions: ActionsDep, who: TechnologistDep, audit: AuditDep,
               names: PatientNamesDep) -> JobOut:
    job = actions.cancel(job_id, who.name)
    audit.noted("cancel", job_id)
    return JobOut.of(job, None, patient_name=names.of_job(job))


@router.post("/{job_id}/priority", response_model=JobOut, summary="Move a queued job to another queue")
def change_priority(job_id: JobId, body: PriorityChange, actions: ActionsDep, who: TechnologistDep,
                    audit: AuditDep, names: PatientNamesDep) -> JobOut:
    job = actions.set_priority(job_id, body.queue, who.name)
    audit.noted("priority", job_id, f"to {body.queue.value}")
    return JobOut.of(job, None, patient_name=names.of_job(job))
