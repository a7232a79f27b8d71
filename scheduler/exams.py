"""The exam picture: one day's exams, their series, and when each series' images are expected.

An exam is one patient and study (``patient_id``, ``study_uid``); a job whose scan carries neither (an
anonymised or test scan) makes an exam of its own per scan, flagged ``identified=False``. A series is
what a retrieval of one protocol would get (:func:`reconq.core.jobs.newest_results`: the newest scan's
newest job per pipeline). Only job records are read, and nothing is written.

When a series is expected (epoch seconds; None: not known, or finished):

- running: ``started_at`` + its expected run time;
- queued: now + the work ahead of it (the rest of the running jobs and the queued jobs before it, in
  queue order, each at its expected run time; unknown ones count as nothing) shared among the live
  workers, + its own expected run time.

A job's expected run time is the history of the device class it runs (or will run) on
(:func:`reconq.scheduler.estimate.history_seconds`), else its ``runtime_estimate_s``, else not known.
A queued job runs on a GPU if a GPU worker is alive, else on the CPU. The progress shown for a running
job with an expected run time is the larger of its reported progress and the share of that time spent
(at most 0.99: only the worker says it is done).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import redis

from reconq.core.constants import QUEUE_ORDER
from reconq.core.jobs import Job, JobStore, newest_results
from reconq.core.states import JobState
from reconq.scheduler.estimate import CPU, GPU, history_seconds
from reconq.scheduler.monitor import live_workers

#: The most a running job's progress is moved on by its elapsed time alone.
TIME_PROGRESS_CAP = 0.99


@dataclass(frozen=True)
class Series:
    protocol: str
    job_id: str
    scan_id: str
    pipeline: str
    state: str
    progress: float
    expected_finish: float | None  # epoch seconds; None: not known, or finished
    ready: bool  # done: a retrieval now gets its images
    error: str
    queue_position: int | None  # 0-based among the queued jobs of its queue; None: not queued


@dataclass(frozen=True)
class Exam:
    patient_id: str
    study_uid: str
    identified: bool  # False: a scan without patient ID or study UID, an exam of its own
    first_at: float  # when its first job was created (epoch seconds)
    series: tuple[Series, ...]


def job_device(job: Job) -> str:
    """The device class a running (or finished) job ran on: its ``gpu`` field is ``cpu`` on CPU workers."""
    return CPU if job.gpu in ("", CPU) else GPU


def device_now(client: redis.Redis) -> str:
    """The device class a queued job will run on: ``gpu`` while a GPU worker is alive, else ``cpu``."""
    return GPU if any(w.gpu_id for w in live_workers(client)) else CPU


class Expectations:
    """Expected run times of jobs, from the history of one device class each (read once per pipeline,
    protocol and class)."""

    def __init__(self, client: redis.Redis, queued_device: str) -> None:
        self.client, self.queued_device = client, queued_device
        self._history: dict[tuple[str, str, str], float | None] = {}

    def device(self, job: Job) -> str:
        return job_device(job) if job.state is JobState.RUNNING else self.queued_device

    def seconds(self, job: Job) -> float | None:
        key = (job.pipeline, job.protocol, self.device(job))
        if key not in self._history:
            self._history[key] = history_seconds(self.client, *key)
        return self._history[key] or job.runtime_estimate_s or None


@dataclass(frozen=True)
class QueuePicture:
    """The queued jobs in the order workers take them, and the work already running."""

    queued: tuple[Job, ...]  # by queue (stat, routine, bulk, others), then queued_at
    running_left: float  # seconds the running jobs are expected to take still
    workers: int  # live workers (at least 1)


def queue_picture(store: JobStore, expect: Expectations, now: float) -> QueuePicture:
    """Every queued and running job's share of the work ahead (whatever day it was made)."""
    ids: dict[str, list[str]] = {JobState.QUEUED.value: [], JobState.RUNNING.value: []}
    for job_id, (state,) in store.scan_fields(["state"]):
        if state in ids:
            ids[state].append(job_id)
    rank = {q.value: i for i, q in enumerate(QUEUE_ORDER)}
    queued = sorted(store.get_many(ids[JobState.QUEUED.value]),
                    key=lambda j: (rank.get(j.queue, len(rank)), j.queued_at or j.created_at, j.seq))
    left = 0.0
    for job in store.get_many(ids[JobState.RUNNING.value]):
        seconds = expect.seconds(job)
        if seconds and job.started_at is not None:
            left += max(0.0, job.started_at + seconds - now)
    workers = sum(1 for w in live_workers(store.redis) if bool(w.gpu_id) == (expect.queued_device == GPU))
    return QueuePicture(tuple(queued), left, max(1, workers))


def queued_finishes(picture: QueuePicture, expect: Expectations, now: float) -> dict[str, tuple[int, float | None]]:
    """Per queued job id: (its 0-based place among the queued jobs of its queue, its expected finish)."""
    out: dict[str, tuple[int, float | None]] = {}
    places: dict[str, int] = {}
    ahead = picture.running_left
    for job in picture.queued:
        seconds = expect.seconds(job)
        place = places.get(job.queue, 0)
        places[job.queue] = place + 1
        out[job.id] = (place, now + ahead / picture.workers + seconds if seconds else None)
        ahead += seconds or 0.0
    return out


def shown_progress(job: Job, expected: float | None, now: float) -> float:
    """The reported progress, moved on by the time spent if the job runs and its run time is expected."""
    if job.state is not JobState.RUNNING or not expected or job.started_at is None:
        return job.progress
    return max(job.progress, min(TIME_PROGRESS_CAP, max(0.0, now - job.started_at) / expected))


def series_of(job: Job, expect: Expectations, queued: dict[str, tuple[int, float | None]], now: float) -> Series:
    seconds = expect.seconds(job) if job.state is JobState.RUNNING else None
    place, finish = queued.get(job.id, (None, None)) if job.state is JobState.QUEUED else (None, None)
    if job.state is JobState.RUNNING and seconds and job.started_at is not None:
        finish = job.started_at + seconds
    return Series(protocol=job.protocol, job_id=job.id, scan_id=job.scan_id, pipeline=job.pipeline,
                  state=job.state.value, progress=shown_progress(job, seconds, now), expected_finish=finish,
                  ready=job.state is JobState.DONE, error=job.error, queue_position=place)


def group_exams(jobs: Iterable[Job]) -> list[list[Job]]:
    """The jobs by exam (patient and study; a scan of its own where either is blank), newest exam
    first (by its newest job)."""
    groups: dict[tuple[str, str, str], list[Job]] = {}
    for job in jobs:
        key = (job.patient_id, job.study_uid, "") if job.patient_id and job.study_uid else ("", "", job.scan_id)
        groups.setdefault(key, []).append(job)
    return sorted(groups.values(), key=lambda js: max((j.created_at, j.seq) for j in js), reverse=True)


def exam_series(jobs: list[Job]) -> list[Job]:
    """The jobs that count of each protocol (:func:`newest_results`), protocols in the order of their
    first job."""
    by_protocol: dict[str, list[Job]] = {}
    for job in sorted(jobs, key=lambda j: j.seq):
        by_protocol.setdefault(job.protocol, []).append(job)
    return [j for candidates in by_protocol.values() for j in newest_results(candidates)]


def day_bounds(day: date) -> tuple[float, float]:
    """Epoch seconds of the start of ``day`` and of the next day, in the local time."""
    start = datetime.combine(day, datetime.min.time())
    return start.timestamp(), (start + timedelta(days=1)).timestamp()


def exams_of_day(store: JobStore, client: redis.Redis, day_start: float, day_end: float,
                 now: float) -> list[Exam]:
    """The exams of the jobs created in ``[day_start, day_end)`` (epoch seconds), newest first, each with
    its series and when their images are expected (see the module doc)."""
    ids = [job_id for job_id, _ in store.scan_fields(["state"], day_start, f"({day_end}")]
    jobs = store.get_many(ids)
    expect = Expectations(client, device_now(client))
    queued = queued_finishes(queue_picture(store, expect, now), expect, now) \
        if any(j.state is JobState.QUEUED for j in jobs) else {}
    exams = []
    for group in group_exams(jobs):
        first = min(group, key=lambda j: (j.created_at, j.seq))
        exams.append(Exam(patient_id=first.patient_id, study_uid=first.study_uid,
                          identified=bool(first.patient_id and first.study_uid), first_at=first.created_at,
                          series=tuple(series_of(j, expect, queued, now) for j in exam_series(group))))
    return exams


def history_now(client: redis.Redis, pipeline: str, protocol: str) -> float | None:
    """The run time a job of ``pipeline`` on ``protocol`` queued now is expected to take, from the history
    of the device class it will run on; None if there is none."""
    return history_seconds(client, pipeline, protocol, device_now(client))
