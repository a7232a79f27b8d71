"""Job records in Redis: create (idempotently), update, list, and find the job a retrieval scan wants.

A job is a Redis hash ``reconq:job:<id>``; every change is also published on ``reconq:events`` so the
dashboard and waiting retrieval sessions hear of it at once. Its state changes only through
:meth:`JobStore.set_state`, along the transitions of :mod:`reconq.core.states` (checked atomically in
Redis); a change the table does not allow is refused and logged, and the job keeps its state. Its stages
(``reading``, ``coil maps``, ...) are recorded as they begin, for the timings the job page shows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import redis

from reconq.core.constants import (
    EVENTS_CHANNEL,
    EXAM_INDEX,
    JOB_ACTIONS,
    JOB_KEY,
    JOB_LOG,
    JOB_SEQ,
    JOB_STAGES,
    JOBS_INDEX,
    RETRIEVALS,
    RUNNING_JOBS,
    SCAN_JOB_SEQ,
    SCAN_JOBS,
)
from reconq.core.scripts import load_script
from reconq.core.states import FINISHED, STAMPS, JobState, allowed_from

log = logging.getLogger(__name__)

_JSON_FIELDS = {"params", "warnings", "report"}
_FLOAT_FIELDS = {"progress", "created_at", "queued_at", "started_at", "finished_at", "runtime_estimate_s",
                 "results_purged_at", "raw_purged_at"}
_INT_FIELDS = {"attempts", "mem_estimate_bytes", "oom_count", "seq", "lost_runs"}
_LOG_LINES_KEPT = 500
_STAGES_KEPT = 200
_SCAN_PAGE = 1000


@dataclass
class Job:
    """One reconstruction of one stored scan. Ids only, never patient data, travel in Celery messages."""

    id: str
    scan_id: str
    pipeline: str
    params: dict[str, Any] = field(default_factory=dict)
    state: JobState = JobState.QUEUED
    queue: str = "routine"
    progress: float = 0.0
    stage: str = ""
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str = ""
    gpu: str = ""
    error: str = ""
    result_path: str = ""
    patient_id: str = ""
    study_uid: str = ""
    protocol: str = ""
    measurement_id: str = ""
    #: GPU memory the job needs, from :mod:`reconq.scheduler.estimate` (0: not estimated yet).
    mem_estimate_bytes: int = 0
    #: Expected run time in seconds, from :mod:`reconq.scheduler.estimate` (0: unknown or not estimated yet).
    runtime_estimate_s: float = 0.0
    #: GPU out-of-memory errors the job has had (each sent it back to wait).
    oom_count: int = 0
    #: Runs that ended with their worker (killed or crashed mid-recon: the job was found ``running`` when
    #: its message came again); at ``RECONQ_MAX_ATTEMPTS`` the job fails. A retry starts it again at 0.
    lost_runs: int = 0
    #: The job's number, from a counter when it was recorded (0: not recorded yet): orders an exam's jobs.
    seq: int = 0
    #: What the recon warned the technologist of (shown on the job, sent to a retrieval scan as ``WRN``).
    warnings: list[str] = field(default_factory=list)
    #: Results beside the images that the recon kept (JSON), e.g. ``{"motion": ...}`` of ``alignsense``.
    report: dict[str, Any] = field(default_factory=dict)
    #: When retention deleted the job's result files (epoch seconds; None: not deleted); ``result_path`` is
    #: then cleared: "images deleted by retention on <date>" (:mod:`reconq.scheduler.retention`).
    results_purged_at: float | None = None
    #: When retention deleted the raw data of the job's scan (None: not deleted): a retry or retro-recon of
    #: it cannot run.
    raw_purged_at: float | None = None

    def to_redis(self) -> dict[str, str]:
        out = {}
        for k, v in asdict(self).items():
            if v is None:
                continue
            out[k] = json.dumps(v) if k in _JSON_FIELDS else str(v)
        return out

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> Job:
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for k, v in raw.items():
            if k not in names:
                continue
            if k in _JSON_FIELDS:
                values[k] = json.loads(v)
            elif k in _FLOAT_FIELDS:
                values[k] = float(v)
            elif k in _INT_FIELDS:
                values[k] = int(v)
            elif k == "state":
                values[k] = JobState(v)
            else:
                values[k] = v
        return cls(**values)

    def public(self) -> dict[str, Any]:
        """The record as JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class StageTiming:
    """One stage of a job: when it began (epoch seconds) and how long it lasted (to the next stage, the
    job's end, or now)."""

    stage: str
    started_at: float
    seconds: float


def exam_key(patient_id: str, study_uid: str, protocol: str) -> str:
    """Index key that ties a retrieval scan to the jobs of the same patient, study and protocol."""
    digest = hashlib.sha256("\x1f".join((patient_id, study_uid, protocol)).encode()).hexdigest()[:32]
    return EXAM_INDEX + digest


def newest_results(candidates: Sequence[Job]) -> list[Job]:
    """The results of one exam and protocol that count (what a retrieval gets, what the exam view shows):
    the newest scan's newest job of each pipeline, oldest pipeline first. A scan's place is its first
    job's number (jobs are numbered as they are recorded), so a retro-recon of an older scan never stands
    in for a newer scan."""
    by_scan: dict[str, list[Job]] = {}
    for job in candidates:
        by_scan.setdefault(job.scan_id, []).append(job)
    if not by_scan:
        return []
    newest = max(by_scan.values(), key=lambda jobs: min(j.seq for j in jobs))
    per_pipeline: dict[str, Job] = {}
    for job in sorted(newest, key=lambda j: j.seq):
        per_pipeline[job.pipeline] = job  # a later job of the same pipeline replaces an earlier one
    return sorted(per_pipeline.values(), key=lambda j: j.seq)


class JobStore:
    """Job records on one Redis connection (``decode_responses=True``)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._create = load_script(client, "reconq.core", "job_create")
        self._update = load_script(client, "reconq.core", "job_update")
        self._delete = load_script(client, "reconq.core", "job_delete")

    def create(self, job: Job) -> bool:
        """Record ``job`` and its indexes at once, and give it its number (``job.seq``); False (and nothing
        written) if the id exists already."""
        keys = [JOB_KEY + job.id, JOBS_INDEX, exam_key(job.patient_id, job.study_uid, job.protocol),
                SCAN_JOBS + job.scan_id, JOB_SEQ]
        fields_flat = [x for kv in job.to_redis().items() for x in kv]
        seq = int(self._create(keys=keys, args=[job.created_at, job.id, *fields_flat]))
        if not seq:
            return False
        job.seq = seq
        self._publish(job.id, state=job.state.value)
        return True

    def get(self, job_id: str) -> Job | None:
        raw = self.redis.hgetall(JOB_KEY + job_id)
        return Job.from_redis(raw) if raw.get("scan_id") else None

    def running_ids(self) -> list[str]:
        """The jobs running now (a set kept with every change of state, not a walk of every job)."""
        return sorted(self.redis.smembers(RUNNING_JOBS))

    def update(self, job_id: str, fence: int | str | None = None, **changes: Any) -> bool:
        """Set fields (not the state: see :meth:`set_state`) of an existing job and publish the change;
        False if there is no such job (or, with ``fence``, if a newer run holds it)."""
        if "state" in changes:
            raise KeyError("a job's state is changed by set_state only")
        return self._write(job_id, None, changes, fence)[0]

    def set_state(self, job_id: str, state: JobState, fence: int | str | None = None, **changes: Any) -> bool:
        """Move the job to ``state`` (with other field changes, and the state's timestamp unless given),
        if the transition table allows it from the state it is in. A move it does not allow, such as a
        late worker setting a finished job running or anything changing a cancelled one, is refused and
        logged: nothing is written and False is returned (so it is for a job that does not exist).

        ``fence``: the run (``attempts`` value) the writer is; the write is refused unless the job is
        ``running`` that run (a run handed back, cancelled, or started again elsewhere writes nothing more).
        ``"=N"``: the start of a run over a record read with ``attempts`` N; of two deliveries of one job
        that both read N, only the first starts it."""
        now = time.time()
        if stamp := STAMPS.get(state):
            changes.setdefault(stamp, now)
        written, before = self._write(job_id, state, changes, fence)
        if not written:
            return False
        if before != state.value:
            self.log(job_id, f"state {state.value}" + (f": {changes['error']}" if changes.get("error") else ""))
        if state.finished:
            self._mark_stage(job_id, "", changes.get("finished_at", now))
        return True

    def _write(self, job_id: str, state: JobState | None, changes: dict[str, Any],
               fence: int | str | None = None) -> tuple[bool, str]:
        """Write ``changes`` (and ``state``, if allowed) in one script; (written, the state before)."""
        job_fields = {f.name for f in fields(Job)}
        bad = set(changes) - job_fields
        if bad:
            raise KeyError(f"not job fields: {sorted(bad)}")
        if state is not None:
            changes = {**changes, "state": state.value}
        mapping = {k: (json.dumps(v) if k in _JSON_FIELDS else str(v)) for k, v in changes.items()}
        allowed = " ".join(s.value for s in allowed_from(state)) if state is not None else ""
        written, current = self._update(keys=[JOB_KEY + job_id, RUNNING_JOBS],
                                        args=[state.value if state else "", allowed,
                                              "" if fence is None else str(fence), job_id,
                                              *[x for kv in mapping.items() for x in kv]])
        if written == -1:
            log.info("job %s: not changed (no such job)", job_id)
            return False, ""
        if written == -2:
            log.warning("job %s: a write of run %s refused: that run no longer holds the job (it is %s)", job_id,
                        str(fence).lstrip("="), current or "(none)")
            return False, current
        if written == 0:
            log.warning("job %s: change of state %s -> %s refused (not an allowed transition); it stays %s",
                        job_id, current or "(none)", state.value if state else "", current or "(none)")
            return False, current
        self._publish(job_id, **{k: v for k, v in changes.items() if k in ("state", "progress", "stage")})
        return True, current

    def enter_stage(self, job_id: str, stage: str, at: float | None = None) -> None:
        """Record that the job's recon began ``stage`` (for the stage timings; the log says so too)."""
        self.log(job_id, f"stage {stage}")
        self._mark_stage(job_id, stage, time.time() if at is None else at)

    def _mark_stage(self, job_id: str, stage: str, at: float) -> None:
        """Append a stage mark (``''``: the job ended) to the job's list of stages."""
        key = JOB_STAGES + job_id
        pipe = self.redis.pipeline()
        pipe.rpush(key, json.dumps({"stage": stage, "at": at}))
        pipe.ltrim(key, -_STAGES_KEPT, -1)
        pipe.execute()

    def stage_timings(self, job: Job, now: float | None = None) -> list[StageTiming]:
        """Per stage of ``job``'s recon, when it began and how long it lasted (to the next stage, the end
        of the job, or ``now`` while it runs)."""
        marks = [json.loads(m) for m in self.redis.lrange(JOB_STAGES + job.id, 0, -1)]
        end = job.finished_at or (time.time() if now is None else now)
        ends = [m["at"] for m in marks[1:]] + [end] if marks else []
        return [StageTiming(m["stage"], m["at"], max(0.0, nxt - m["at"]))
                for m, nxt in zip(marks, ends, strict=True) if m["stage"]]

    def log(self, job_id: str, line: str) -> None:
        """Append a line to the job's log (kept to the newest few hundred)."""
        key = JOB_LOG + job_id
        pipe = self.redis.pipeline()
        pipe.rpush(key, f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}")
        pipe.ltrim(key, -_LOG_LINES_KEPT, -1)
        pipe.execute()

    def log_lines(self, job_id: str) -> list[str]:
        return list(self.redis.lrange(JOB_LOG + job_id, 0, -1))

    def states(self, ids: list[str]) -> list[str | None]:
        """The state of each job in ``ids`` (None for an unknown id), in one round trip."""
        pipe = self.redis.pipeline()
        for job_id in ids:
            pipe.hget(JOB_KEY + job_id, "state")
        return pipe.execute()

    def count(self) -> int:
        return int(self.redis.zcard(JOBS_INDEX))

    def jobs_for_scan(self, scan_id: str) -> list[str]:
        return sorted(self.redis.smembers(SCAN_JOBS + scan_id))

    def exam_jobs(self, patient_id: str, study_uid: str, protocol: str, limit: int = 200) -> list[Job]:
        """The jobs of this patient, study and protocol, newest first (by job number, not by clock)."""
        ids = self.redis.zrevrange(exam_key(patient_id, study_uid, protocol), 0, limit - 1)
        return self.get_many(ids)

    def record_retrieval(self, found: bool) -> None:
        """Count one retrieval scan and whether it got its images (for the dashboard's success rate)."""
        now = time.time()
        self.redis.zadd(RETRIEVALS, {f"{now:.6f}:{'ok' if found else 'miss'}:{os.getpid()}": now})

    def retrieval_counts(self, since: float) -> tuple[int, int]:
        """(found, not found) retrieval scans since ``since`` (epoch seconds)."""
        members = self.redis.zrangebyscore(RETRIEVALS, since, "+inf")
        ok = sum(1 for m in members if ":ok:" in m)
        return ok, len(members) - ok

    def get_many(self, ids: list[str]) -> list[Job]:
        """The jobs of ``ids`` that exist, in that order, in one round trip."""
        pipe = self.redis.pipeline()
        for job_id in ids:
            pipe.hgetall(JOB_KEY + job_id)
        return [Job.from_redis(raw) for raw in pipe.execute() if raw.get("scan_id")]

    def query(self, offset: int = 0, limit: int = 50, state: JobState | None = None, protocol: str = "",
              since: float | None = None, until: float | None = None) -> tuple[list[Job], int]:
        """A page of jobs newest first, filtered by state, protocol (case-insensitive substring) and
        creation time (``since <= created_at < until``); returns the page and how many jobs match."""
        hi = "+inf" if until is None else f"({until}"
        lo = "-inf" if since is None else since
        if state is None and not protocol:
            ids = self.redis.zrevrangebyscore(JOBS_INDEX, hi, lo, start=offset, num=limit)
            total = int(self.redis.zcount(JOBS_INDEX, lo, hi))
            return self.get_many(ids), total
        wanted = protocol.lower()
        matched: list[str] = []
        for job_id, (st, proto) in self.scan_fields(["state", "protocol"], lo, hi):
            if (state is None or st == state.value) and wanted in (proto or "").lower():
                matched.append(job_id)
        return self.get_many(matched[offset:offset + limit]), len(matched)

    def scan_fields(self, names: list[str], lo: float | str = "-inf",
                    hi: float | str = "+inf") -> Iterator[tuple[str, list[str | None]]]:
        """(job id, the named fields) of every job created in [lo, hi], newest first, read in pages."""
        start = 0
        while True:
            ids = self.redis.zrevrangebyscore(JOBS_INDEX, hi, lo, start=start, num=_SCAN_PAGE)
            if not ids:
                return
            pipe = self.redis.pipeline()
            for job_id in ids:
                pipe.hmget(JOB_KEY + job_id, names)
            yield from zip(ids, pipe.execute(), strict=True)
            start += _SCAN_PAGE

    def next_job_id(self, scan_id: str) -> str:
        """A new, unused job id ``<scan_id>-j<n>`` for another job on a stored scan (an INCR counter)."""
        while True:
            job_id = f"{scan_id}-j{self.redis.incr(SCAN_JOB_SEQ + scan_id)}"
            if not self.redis.exists(JOB_KEY + job_id):
                return job_id

    def clear_fields(self, job_id: str, *names: str) -> None:
        """Remove optional fields (timestamps) from a job, as when it is queued again."""
        if names:
            self.redis.hdel(JOB_KEY + job_id, *names)

    def record_action(self, job_id: str, who: str, action: str, detail: str = "") -> dict[str, Any]:
        """Record that ``who`` did ``action`` on the job (kept for good), log it and publish it."""
        entry = {"at": time.time(), "who": who, "action": action, "detail": detail}
        self.redis.rpush(JOB_ACTIONS + job_id, json.dumps(entry))
        self.log(job_id, f"{action} by {who}" + (f": {detail}" if detail else ""))
        self._publish(job_id, action=action)
        return entry

    def actions(self, job_id: str) -> list[dict[str, Any]]:
        """The job's recorded staff actions, oldest first."""
        return [json.loads(a) for a in self.redis.lrange(JOB_ACTIONS + job_id, 0, -1)]

    def retrieval_totals(self) -> tuple[int, int]:
        """(found, not found) retrieval scans ever recorded."""
        return self.retrieval_counts(0.0)

    def delete(self, job_id: str, ended_before: float | None = None) -> bool:
        """Delete an ended job's record, log, stages and actions, and its entries in the indexes (all jobs,
        its exam's, its scan's; the scan's job counter with its last job), at once, unless it is not ended
        (or ended after ``ended_before``, epoch seconds) when the script runs. True if deleted.

        For retention (:mod:`reconq.scheduler.retention`), which deletes records only of scans gone from
        disk: a complete scan left on disk without a job would be queued again by the reconciler."""
        job = self.get(job_id)
        if job is None:
            return False
        keys = [JOB_KEY + job_id, JOBS_INDEX, exam_key(job.patient_id, job.study_uid, job.protocol),
                SCAN_JOBS + job.scan_id, JOB_LOG + job_id, JOB_STAGES + job_id, JOB_ACTIONS + job_id,
                SCAN_JOB_SEQ + job.scan_id]
        ended = " ".join(sorted(s.value for s in FINISHED))
        deleted = int(self._delete(keys=keys, args=[job_id, ended, "" if ended_before is None else repr(ended_before)]))
        if deleted != 1:
            log.info("job %s: not deleted (%s)", job_id, "gone" if deleted < 0 else "not ended, or ended since")
            return False
        self._publish(job_id, action="deleted")
        return True

    def _publish(self, job_id: str, **what: Any) -> None:
        self.redis.publish(EVENTS_CHANNEL, json.dumps({"id": job_id, **what}))
