"""Retro-recon: new jobs on stored scans, with another pipeline or parameters (technologists and admins)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body

from reconq.api.deps import ActionsDep, AuditDep, ScanId, TechnologistDep
from reconq.api.problems import ACTION_ERRORS, problem
from reconq.api.schemas import JobOut, RetroBatch, RetroRecon

router = APIRouter(prefix="/api", tags=["actions"], responses={
    **ACTION_ERRORS, 404: problem("No such scan"), 422: problem("Unknown pipeline")})


@router.post("/scans/{scan_id}/jobs", response_model=JobOut, status_code=201,
             summary="Retro-recon: a new job on a stored scan")
def retro_recon(scan_id: ScanId, actions: ActionsDep, who: TechnologistDep, audit: AuditDep,
                body: Annotated[RetroRecon, Body()]) -> JobOut:
    job = actions.retro_recon(scan_id, body.pipeline, body.params, body.queue, who.name)
    audit.noted("retro", job.id, f"scan {scan_id} {body.pipeline}")
    return JobOut.of(job, None)


@router.post("/retro", response_model=list[JobOut], status_code=201,
             summary="Retro-recon of several scans as one batch (all checked first; placed together)")
def retro_recon_batch(actions: ActionsDep, who: TechnologistDep, audit: AuditDep,
                      body: Annotated[RetroBatch, Body()]) -> list[JobOut]:
    jobs = actions.retro_recon_many(body.scan_ids, body.pipeline, body.params, body.queue, who.name)
    for job in jobs:
        audit.noted("retro", job.id, f"scan {job.scan_id} {body.pipeline} (batch)")
    return [JobOut.of(job, None) for job in jobs]
