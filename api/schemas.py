"""Every model the HTTP API reads or answers with (its OpenAPI description is built from these).

The services hand out plain records (:class:`reconq.core.jobs.Job`, the dataclasses of
:mod:`reconq.scheduler.monitor`); the models here say what of them goes over the wire, and how.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time
from typing import Annotated, Any

from pydantic import BaseModel, Field
from typing_extensions import TypeAliasType

from reconq.api.auth import Role
from reconq.core.constants import Queue
from reconq.core.diskuse import DiskUsage
from reconq.core.jobs import Job
from reconq.core.states import JobState
from reconq.scheduler.exams import Exam
from reconq.scheduler.monitor import ClusterStatus

#: A pipeline parameter: JSON, spelled out so that the OpenAPI description says what it may hold.
Param = TypeAliasType("Param", "str | int | float | bool | None | list[Param] | dict[str, Param]")
#: OpenAPI content of answers that are not JSON.
BINARY = {"schema": {"type": "string", "format": "binary"}}
TEXT = {"schema": {"type": "string"}}


# --- jobs -----------------------------------------------------------------------------------------

class Masker:
    """Patient identifiers as anonymous (public-read) viewers see them: a prefix and the first 6 hex digits of
    an HMAC-SHA256 of the value, keyed with a key derived from the server secret
    (:func:`reconq.api.auth.load_secret`), e.g. ``P-3fa9c2``. Stable per value (jobs of one patient can be
    told apart from another's), but not a bare hash: without the secret, no small ID space can be searched
    for a match. Every masking for anonymous viewers goes through :meth:`JobOut.of` and :meth:`ExamOut.of`."""

    def __init__(self, secret: bytes) -> None:
        self._key = hmac.new(secret, b"reconq public-read mask v1", hashlib.sha256).digest()

    def mask(self, value: str, prefix: str = "P") -> str:
        """``value`` masked (``""`` stays ``""``: there is nothing to tell apart)."""
        if not value:
            return ""
        return f"{prefix}-{hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:6]}"


#: Who sees what: ``None`` for staff (everything unmasked), a :class:`Masker` for anonymous viewers.
View = Masker | None


def run_time(job: Job, now: float) -> float | None:
    """Seconds the job has run: to its finish, or until ``now`` while it runs."""
    if job.started_at is None:
        return None
    end = job.finished_at if job.finished_at is not None else (now if job.state is JobState.RUNNING else None)
    return None if end is None else max(0.0, end - job.started_at)


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
    measurement_id: str = Field(description="The scanner's measurement id; empty for viewers who are not signed in")
    patient: str = Field(description="Patient ID; masked (`P-` and 6 hex digits of a keyed hash) for viewers who are "
                                     "not signed in as staff")
    patient_name: str | None = Field(None, exclude_if=lambda v: v is None, description=(
        "The patient's name as the scan's MRD header gives it (DICOM PN, `Family^Given`), for staff (empty where "
        "the scan names none); absent for viewers who are not signed in as staff"))
    has_images: bool
    warnings: list[str] = Field(default_factory=list, description="What the recon warned of (sent to the "
                                                                  "retrieval scan as WRN)")

    redacted: bool = Field(False, description="True for viewers who are not signed in: no parameters, log, "
                                              "report, previews or measurement id, the patient ID masked")

    @classmethod
    def of(cls, job: Job, view: View, now: float | None = None, patient_name: str = "") -> JobOut:
        """``job`` as a viewer sees it: everything for staff (``view`` None), with ``patient_name`` (read from
        the scan by :class:`reconq.api.deps.PatientNames`); for anonymous viewers (a :class:`Masker`) the
        patient ID masked, no name (the key absent), parameters or measurement id."""
        data = job.public()
        data["has_images"] = job.state is JobState.DONE and bool(job.result_path)
        if view is None:
            data.update(patient=job.patient_id, patient_name=patient_name)
        else:
            data.update(patient=view.mask(job.patient_id), patient_name=None, measurement_id="", params={},
                        redacted=True)
        data["run_time_s"] = run_time(job, time.time() if now is None else now)
        data["memory_estimate_gb"] = round(job.mem_estimate_bytes / 1e9, 2) if job.mem_estimate_bytes else None
        data["expected_run_time_s"] = job.runtime_estimate_s or None
        return cls.model_validate(data)


class StageTiming(BaseModel):
    stage: str
    started_at: float = Field(description="Epoch seconds")
    seconds: float


class ActionRecord(BaseModel):
    at: float
    who: str
    action: str
    detail: str


class JobDetail(JobOut):
    """One job with everything the job page shows (for anonymous viewers: no log, report or previews)."""

    log: list[str]
    stages: list[StageTiming]
    actions: list[ActionRecord]
    previews: list[int] = Field(description="Indexes of the images with a PNG preview")
    image_count: int
    report: dict[str, Any] = Field(default_factory=dict, description="Results beside the images, by name; "
                                   "a table is {title, columns, rows} (alignsense: the motion per shot)")


class JobPage(BaseModel):
    total: int = Field(description="Jobs matching the filters")
    offset: int
    limit: int
    jobs: list[JobOut]


# --- exams ----------------------------------------------------------------------------------------

class SeriesOut(BaseModel):
    """One protocol's result that counts (the newest scan's newest job of a pipeline), and when."""

    protocol: str
    job_id: str
    scan_id: str
    pipeline: str
    state: JobState
    progress: float = Field(ge=0, le=1, description="Reported progress, moved on by the time spent while "
                                                    "it runs (at most 0.99 until done)")
    expected_finish: float | None = Field(description="Epoch seconds the images are expected; null: not "
                                                      "known, or finished")
    ready: bool = Field(description="Done: a retrieval scan gets its images now")
    queue_position: int | None = Field(description="0-based among the queued jobs of its queue; null: not "
                                                   "queued")
    error: str


class ExamOut(BaseModel):
    """One patient and study (or one scan without either: ``identified`` false) and its series."""

    patient: str = Field(description="Patient ID; masked for viewers who are not signed in as staff")
    patient_name: str | None = Field(None, exclude_if=lambda v: v is None, description=(
        "The patient's name (DICOM PN) from the exam's scans, for staff (empty where none names one); absent for "
        "viewers who are not signed in as staff"))
    study_uid: str = Field(description="Study instance UID; masked (`S-` and 6 hex digits) for viewers who are not "
                                       "signed in as staff")
    identified: bool = Field(description="False: the scan has no patient ID or study UID")
    first_at: float = Field(description="When its first job was created (epoch seconds)")
    series: list[SeriesOut] = Field(description="In the order of their first job")

    @classmethod
    def of(cls, exam: Exam, view: View, patient_name: str = "") -> ExamOut:
        """``exam`` as a viewer sees it (see :meth:`JobOut.of`)."""
        patient, study = ((exam.patient_id, exam.study_uid) if view is None
                          else (view.mask(exam.patient_id), view.mask(exam.study_uid, "S")))
        return cls(patient=patient, patient_name=patient_name if view is None else None, study_uid=study,
                   identified=exam.identified, first_at=exam.first_at,
                   series=[SeriesOut.model_validate(s, from_attributes=True) for s in exam.series])


class ExamDay(BaseModel):
    day: str = Field(description="YYYY-MM-DD, the server's local time")
    exams: list[ExamOut] = Field(description="Newest first (by their newest job)")


# --- staff actions --------------------------------------------------------------------------------

class PriorityChange(BaseModel):
    queue: Queue = Field(description="stat (first), routine or bulk (last)")


class RetroRecon(BaseModel):
    pipeline: str = Field(min_length=1, max_length=100)
    params: dict[str, Param] | None = Field(None, description="Pipeline parameters; null: the scan's own")
    queue: Queue = Queue.BULK


class RetroBatch(RetroRecon):
    scan_ids: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=1000, description="The stored scans; one job each, placed as one batch")


# --- status ---------------------------------------------------------------------------------------

class Health(BaseModel):
    """Answered with 200 when Redis answers, 503 (the same body) when it does not."""

    status: str = Field(description='"ok", or "degraded" when Redis does not answer')
    redis: bool


class FileCountOut(BaseModel):
    count: int
    bytes: int


class DiskOut(BaseModel):
    """The data root's file system and what ReconQ keeps on it (:func:`reconq.core.diskuse.disk_usage`)."""

    total_bytes: int = Field(description="Size of the data root's file system")
    free_bytes: int = Field(description="Free space an unprivileged process may use (what new scans need)")
    used_bytes: int
    raw: FileCountOut = Field(description="Raw scans (raw.h5, or its part while being written): scans and bytes")
    results: FileCountOut = Field(description="Result MRD files: files and bytes")
    walked_at: float = Field(description="When the scans folder was last counted (epoch seconds; counts are "
                                         "reused for up to a minute)")
    min_free_bytes: int = Field(description="The setting: below this free space the gateway refuses new scans")
    low: bool = Field(description="free_bytes is below min_free_bytes")

    @classmethod
    def of(cls, usage: DiskUsage, min_free_bytes: int) -> DiskOut:
        return cls.model_validate({**dataclasses.asdict(usage), "min_free_bytes": min_free_bytes,
                                   "low": usage.free_bytes < min_free_bytes})


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


class ActionStates(BaseModel):
    """The states in which each staff action is possible."""

    retry: list[JobState]
    cancel: list[JobState]
    priority: list[JobState]


class Vocabulary(BaseModel):
    """The job state machine and the queues, so that the dashboard hard-codes neither."""

    states: list[JobState] = Field(description="Every state, in the order a job goes through them")
    transitions: dict[JobState, list[JobState]] = Field(description="State -> the states it may change to")
    finished: list[JobState] = Field(description="States a job ends in")
    cancellable: list[JobState] = Field(description="States from which staff may cancel a job")
    active: list[JobState] = Field(description="States of a job on its way (not finished)")
    queues: list[Queue] = Field(description="The priority queues, served first to last")
    actions: ActionStates


# --- sign-in --------------------------------------------------------------------------------------

class SignIn(BaseModel):
    """Sign in with a name and password, or with an API token."""

    name: str = Field("", max_length=100, description="Staff name (with `password`)")
    password: str = Field("", max_length=1000, description="Password (with `name`)")
    token: str = Field("", max_length=1000, description="API token (instead of name and password)")


class Me(BaseModel):
    """The viewer as the API sees it."""

    name: str
    staff: bool
    role: Role | None = Field(None, description="viewer, technologist or admin; null when not signed in (the "
                                                "dashboard offers the actions the role may do)")
    public_read: bool = Field(description="Whether viewing without sign-in is allowed")


# --- GPUs -----------------------------------------------------------------------------------------

class ReservationOut(BaseModel):
    job_id: str
    bytes: int
    worker: str
    started: bool = Field(description="False: reserved for a job sent to the GPU's queue, not started yet")


class WorkerOut(BaseModel):
    name: str
    host: str
    pid: int
    gpu_id: str = Field(description='"" for a CPU worker')
    job_id: str = Field(description='"" when idle')
    job_since: float | None
    seen: float
    queues: list[str]


class GpuOut(BaseModel):
    id: str
    name: str
    host: str
    index: int
    simulated: bool
    total_bytes: int
    used_bytes: int
    free_bytes: int
    reserved_bytes: int
    utilization_pct: float | None
    temperature_c: float | None
    seen: float
    alive: bool = Field(description="A worker of this GPU sent a heartbeat within its TTL")
    queued: int = Field(description="Jobs in the GPU's own queue, memory reserved, not started")
    workers: list[WorkerOut]
    reservations: list[ReservationOut]


class WaitingJobOut(BaseModel):
    job_id: str
    queue: str
    need_bytes: int
    stage: str


class ClusterOut(BaseModel):
    at: float
    gpus: list[GpuOut]
    cpu_workers: list[WorkerOut]
    waiting: list[WaitingJobOut]
    queues: dict[str, int] = Field(description="stat, routine, bulk, cpu: messages not yet taken by a worker")

    @classmethod
    def of(cls, status: ClusterStatus) -> ClusterOut:
        return cls.model_validate(dataclasses.asdict(status))
