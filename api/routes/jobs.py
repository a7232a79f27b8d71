"""``/api/jobs``: jobs, paged and filtered; one job with its log, stage timings, staff actions and
previews; its result as MRD or DICOM."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response

from reconq.api import exports
from reconq.api.deps import AuditDep, JobId, JobStoreDep, PatientNamesDep, ScanStoreDep, SettingsDep, StaffDep, ViewDep
from reconq.api.problems import JOB_ERRORS, Responses, problem
from reconq.api.schemas import BINARY, ActionRecord, JobDetail, JobOut, JobPage, StageTiming
from reconq.core.jobs import Job, JobStore
from reconq.core.results import result_file
from reconq.core.states import JobState
from reconq.core.storage import ScanStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/jobs", tags=["jobs"])

NO_IMAGES: Responses = {409: problem("No images yet"),
                         503: problem("The audit log cannot be written: no patient data is served")}


def job_or_404(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    if job.id != job_id:  # a record whose id is not its key's was not written by ReconQ
        log.warning("job %r: its record names the id %r; refused", job_id, job.id)
        raise HTTPException(404, f"no job {job_id!r}")
    return job


def _result_file(job: Job, scans: ScanStore) -> Path | None:
    """The job's result file, or None (not done, or no file there). Its name is derived from the job's ids
    and run under this data root (:func:`~reconq.core.results.result_file`), never read from the record:
    whoever writes Redis cannot make the API serve another file (``result_path`` is only information)."""
    if job.state is not JobState.DONE:
        return None
    try:
        path = result_file(scans, job)
    except ValueError as e:
        log.warning("job %s: no result file: %s", job.id, e)
        return None
    return path if path.is_file() else None


def _result_or_409(job: Job, scans: ScanStore) -> Path:
    path = _result_file(job, scans)
    if path is None:
        raise HTTPException(409, f"job {job.id} has no images (state {job.state.value})")
    return path


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


@router.get("", response_model=JobPage, summary="Jobs, newest first, filtered", responses=JOB_ERRORS)
def list_jobs(
    store: JobStoreDep,
    view: ViewDep,
    names: PatientNamesDep,
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
    return JobPage(total=total, offset=offset, limit=limit,
                   jobs=[JobOut.of(j, view, now, names.of_job(j) if view is None else "") for j in jobs])


@router.get("/{job_id}", response_model=JobDetail, summary="One job, with its log, stages and actions",
            responses=JOB_ERRORS)
def get_job(job_id: JobId, store: JobStoreDep, scans: ScanStoreDep, view: ViewDep, names: PatientNamesDep,
            audit: AuditDep) -> JobDetail:
    job = job_or_404(store, job_id)
    path = _result_file(job, scans)
    count = exports.count_images(path) if path is not None else 0
    audit.noted("view", job_id)
    staff = view is None  # anonymous viewers (public read) get no log, report, previews or patient name
    name = names.of_job(job) if staff else ""
    return JobDetail(**JobOut.of(job, view, patient_name=name).model_dump(),
                     log=store.log_lines(job_id) if staff else [],
                     stages=[StageTiming.model_validate(t, from_attributes=True) for t in store.stage_timings(job)],
                     actions=[ActionRecord(**a) for a in store.actions(job_id)],
                     previews=exports.preview_indexes(count) if staff else [], image_count=count,
                     report=job.report if staff else {})


@router.get("/{job_id}/images", response_class=FileResponse, summary="The result MRD file (staff)",
            responses={**JOB_ERRORS, **NO_IMAGES, 200: {"content": {"application/x-hdf5": BINARY}}})
def get_job_images(job_id: JobId, store: JobStoreDep, scans: ScanStoreDep, who: StaffDep,
                   audit: AuditDep) -> FileResponse:
    path = _result_or_409(job_or_404(store, job_id), scans)
    audit.required("download-mrd", job_id)
    return FileResponse(path, media_type="application/x-hdf5", filename=f"{job_id}.h5")


@router.get("/{job_id}/dicom", response_class=Response, summary="The result as DICOM files in a zip (staff)",
            responses={**JOB_ERRORS, **NO_IMAGES, 200: {"content": {"application/zip": BINARY}}})
def get_job_dicom(job_id: JobId, store: JobStoreDep, scans: ScanStoreDep, who: StaffDep, audit: AuditDep,
                  settings: SettingsDep) -> Response:
    job = job_or_404(store, job_id)
    path = _result_or_409(job, scans)
    audit.required("download-dicom", job_id)
    data = exports.dicom_zip(path, job.id, f"{job.protocol} {job.pipeline} ReconQ".strip(),
                             uid_root=settings.dicom_uid_root)
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{job_id}-dicom.zip"'})


@router.get("/{job_id}/previews/{index}.png", response_class=Response, summary="PNG preview of one image (staff)",
            responses={**JOB_ERRORS, **NO_IMAGES, 200: {"content": {"image/png": BINARY}}})
def get_preview(job_id: JobId, index: Annotated[int, PathParam(ge=0)], store: JobStoreDep, scans: ScanStoreDep,
                who: StaffDep, audit: AuditDep) -> Response:
    path = _result_or_409(job_or_404(store, job_id), scans)
    try:
        png = exports.preview_png(path, index)
    except IndexError as e:
        raise HTTPException(404, str(e)) from e
    audit.required("preview", job_id, f"image {index}")
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})
