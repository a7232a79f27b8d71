"""Retention: raw scans, result files and job records deleted once the site no longer keeps them.

Settings (days; 0 keeps forever): ``keep_raw_days``, ``keep_results_days``, ``keep_jobs_days``. The gateway
applies them every ``purge_interval_s`` (:meth:`reconq.gateway.server.Gateway.purge_forever`), one gateway at
a time (a lock in Redis), and ``reconq purge`` on demand (:func:`run_purge`, ``--dry-run`` to list only).

What is due, in two steps: :func:`plan_purge` reads the scans on disk and the job records and lists what is
due, writing nothing; :func:`apply_purge` deletes it, checking each item again just before.

- **Raw data** of a scan, ``keep_raw_days`` after the last job on it ended (done, failed or cancelled; a
  cut-off scan without a job: after it was cut off). Never a scan still ``receiving``, one with a job not
  ended (queued, waiting, running, ...), one that a job not ended names as its reference scan (by id, or by
  protocol: then every scan of that patient, study and protocol), nor a complete scan without any job (the
  reconciler queues it). The raw file goes; the folder goes with it when no result file is left, else its
  record stays, marked ``incomplete`` with ``raw_purged_at`` and an error saying so, so nothing queues,
  indexes or references it again (a retro-recon is refused: "scan ... is incomplete").
- **Result files** of an ended job, ``keep_results_days`` after it ended: each run's file. The job record
  gets ``results_purged_at`` and its ``result_path`` cleared, so the API and retrieval can say "images deleted
  by retention on <date>". A scan folder with neither raw file nor results left goes.
- **Job records** (with their log, stages, actions and index entries), ``keep_jobs_days`` after the job
  ended, and only once its scan's folder is gone: the raw data and every result deleted (a job record never
  outlives its scan's files silently, and a complete scan on disk without a job would be queued again). With
  ``keep_raw_days`` or ``keep_results_days`` 0, records are therefore kept as long as their files.

Before a raw file goes, its record is marked and taken out of the scan index, and the scan's jobs are read
once more: a retro-recon queued on the scan since the plan (or a retry) puts the record back and keeps the
scan. The log says counts, bytes and scan and job ids only, never patient data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis

from reconq.core.constants import (
    EXAM_INDEX,
    JOB_KEY,
    PURGE_LOCK,
    REFERENCE_PROTOCOL,
    REFERENCE_SCAN,
    SCAN_GUARD,
    SCANS_INDEXED,
)
from reconq.core.dataroot import DataRootError, check_data_root
from reconq.core.jobs import JobStore, exam_key
from reconq.core.scripts import load_script
from reconq.core.settings import Settings
from reconq.core.states import FINISHED, JobState
from reconq.core.storage import ScanRecord, ScanState, ScanStore
from reconq.scheduler import scanindex

log = logging.getLogger(__name__)

DAY_S = 86400.0
#: String: the token of the process purging now (SET NX PX): one purge at a time over a shared data root.
#: How long the lock lasts unless its holder renews it (it does, as it goes): a holder that dies frees it.
PURGE_LOCK_TTL_S = 600.0
_RENEW_EVERY_S = 30.0
_ROOT_CHECK_S = 2.0  # how often a purge looks again that its data root is the recorded one
_JOB_FIELDS = ["scan_id", "state", "finished_at", "created_at", "params", "patient_id", "study_uid", "protocol"]


class Kind(StrEnum):
    RAW = "raw"  # a scan's raw file (and its folder, where nothing else is left)
    RESULTS = "results"  # an ended job's result files
    JOB = "job"  # an ended job's record in Redis


@dataclass(frozen=True)
class PurgeItem:
    """One thing due for deletion. ``id``: the scan id (raw) or the job id (results, job)."""

    kind: Kind
    id: str
    scan_id: str
    bytes: int
    age_days: float  # since the job (raw: the scan's last job) ended
    ended_at: float
    files: tuple[str, ...] = ()  # results: the files, relative to the data root

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value, "id": self.id, "scan_id": self.scan_id,
                               "bytes": self.bytes, "age_days": round(self.age_days, 2)}
        if self.files:
            out["files"] = list(self.files)
        return out


@dataclass(frozen=True)
class Kept:
    """An item of the plan that was not deleted, and why (it changed since the plan, or a delete failed)."""

    kind: Kind
    id: str
    why: str


@dataclass
class PurgePlan:
    """What is due at ``now`` (see the module doc); ``folders``: scans whose folder goes too."""

    now: float
    keep_raw_days: float
    keep_results_days: float
    keep_jobs_days: float
    items: list[PurgeItem] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    #: scans past ``keep_raw_days`` kept because a job not ended uses them as its reference scan
    referenced: list[str] = field(default_factory=list)

    @property
    def off(self) -> bool:
        return not (self.keep_raw_days or self.keep_results_days or self.keep_jobs_days)

    def cutoff(self, kind: Kind) -> float:
        """The latest end (epoch seconds) of what is due of ``kind``."""
        days = {Kind.RAW: self.keep_raw_days, Kind.RESULTS: self.keep_results_days, Kind.JOB: self.keep_jobs_days}
        return self.now - days[kind] * DAY_S

    def of(self, kind: Kind) -> list[PurgeItem]:
        return [i for i in self.items if i.kind is kind]


@dataclass
class PurgeReport:
    """What a purge deleted (or, ``dry_run``, would delete): ``items``, and the plan's items it kept."""

    dry_run: bool
    now: float
    keep_days: dict[str, float]
    items: list[PurgeItem] = field(default_factory=list)
    folders_removed: list[str] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    referenced: list[str] = field(default_factory=list)
    #: why the purge did nothing at all ('' : it ran), e.g. another purge holds the lock
    skipped: str = ""

    @property
    def off(self) -> bool:
        return not any(self.keep_days.values())

    def totals(self) -> dict[str, dict[str, int]]:
        out = {}
        for kind in Kind:
            items = [i for i in self.items if i.kind is kind]
            files = sum(len(i.files) for i in items) if kind is Kind.RESULTS else len(items)
            out[kind.value] = {"count": len(items), "files": files, "bytes": sum(i.bytes for i in items)}
        return out

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``reconq purge --json``)."""
        totals = self.totals()
        return {"dry_run": self.dry_run, "now": self.now, "off": self.off, "skipped": self.skipped,
                "keep_days": dict(self.keep_days), "items": [i.as_dict() for i in self.items],
                "folders_removed": list(self.folders_removed),
                "kept": [{"kind": k.kind.value, "id": k.id, "why": k.why} for k in self.kept],
                "referenced": list(self.referenced),
                "totals": {**totals, "bytes": sum(t["bytes"] for t in totals.values())}}

    def lines(self) -> list[str]:
        """A summary for people: ``would delete 3 raw scans (1.2 GB), 5 result files (40 MB), 2 job records``."""
        if self.off:
            return ["retention is off (RECONQ_KEEP_RAW_DAYS, RECONQ_KEEP_RESULTS_DAYS and RECONQ_KEEP_JOBS_DAYS "
                    "are 0: everything is kept); nothing deleted"]
        if self.skipped:
            return [f"nothing deleted: {self.skipped}"]
        keeps = ", ".join(f"{what} {_days(self.keep_days[key])}" for what, key in
                          (("raw data", "keep_raw_days"), ("results", "keep_results_days"),
                           ("job records", "keep_jobs_days")))
        t = self.totals()
        if not self.items:
            out = [f"nothing is due for deletion (kept: {keeps})"]
        else:
            verb = "would delete" if self.dry_run else "deleted"
            out = [f"{verb} {_count(t['raw']['count'], 'raw scan')} ({_size(t['raw']['bytes'])}), "
                   f"{_count(t['results']['files'], 'result file')} ({_size(t['results']['bytes'])}), "
                   f"{_count(t['job']['count'], 'job record')} (kept: {keeps})"]
            if self.folders_removed:
                out.append(f"{_count(len(self.folders_removed), 'scan folder')} "
                           f"{'would be removed' if self.dry_run else 'removed'} whole (nothing left in them)")
        if self.referenced:
            named = ", ".join(self.referenced[:5]) + (", ..." if len(self.referenced) > 5 else "")
            out.append(f"{_count(len(self.referenced), 'scan')} past its raw retention kept: a job not ended uses "
                       f"it as reference scan ({named})")
        out += [f"kept {k.kind.value} {k.id}: {k.why}" for k in self.kept]
        return out


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _days(days: float) -> str:
    return "forever" if not days else f"{days:g} day{'' if days == 1 else 's'}"


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def retention_on(settings: Settings) -> bool:
    """Whether any ``keep_*`` setting asks for deletions."""
    return bool(settings.keep_raw_days or settings.keep_results_days or settings.keep_jobs_days)


# --- what the job records say -----------------------------------------------------------------------

@dataclass(frozen=True)
class _JobRow:
    id: str
    scan_id: str
    state: JobState | None  # None: a record without a state we know (treated as not ended)
    ended_at: float | None  # when it ended (None: not ended)
    params: dict[str, Any]
    patient_id: str
    study_uid: str
    protocol: str

    @property
    def exam(self) -> tuple[str, str, str]:
        """What a retrieval scan matches it by (:func:`reconq.core.jobs.exam_key`)."""
        return self.patient_id, self.study_uid, self.protocol

    @property
    def ended(self) -> bool:
        return self.state in FINISHED


def _row(job_id: str, values: list[str | None]) -> _JobRow | None:
    scan_id, state, finished_at, created_at, params, patient_id, study_uid, protocol = values
    if not scan_id:
        return None  # the index names a record that is gone
    try:
        st: JobState | None = JobState(state) if state else None
    except ValueError:
        st = None
    ended_at = None
    if st in FINISHED:
        ended_at = float(finished_at or created_at or 0.0)
    try:
        parsed = json.loads(params) if params else {}
    except ValueError:
        parsed = {}
    return _JobRow(job_id, scan_id, st, ended_at, parsed if isinstance(parsed, dict) else {},
                   patient_id or "", study_uid or "", protocol or "")


def _job_rows(jobs: JobStore) -> list[_JobRow]:
    """Every job record, read in pages (the fields retention needs only)."""
    return [r for job_id, values in jobs.scan_fields(_JOB_FIELDS) if (r := _row(job_id, values)) is not None]


def _rows_of_scan(jobs: JobStore, scan_id: str) -> list[_JobRow]:
    """The jobs of one scan, read now."""
    ids = jobs.jobs_for_scan(scan_id)
    pipe = jobs.redis.pipeline()
    for job_id in ids:
        pipe.hmget(JOB_KEY + job_id, _JOB_FIELDS)
    return [r for job_id, values in zip(ids, pipe.execute(), strict=True) if (r := _row(job_id, values))]


def _referenced(rows: Iterable[_JobRow], records: Iterable[ScanRecord]) -> dict[str, str]:
    """Scan id -> the job not ended that may read it as its reference scan: named by id, or by protocol (every
    scan of that patient, study and protocol: a running job may have resolved an older one than the newest)."""
    out: dict[str, str] = {}
    by_protocol: dict[tuple[str, str, str], str] = {}
    for row in rows:
        if row.ended:
            continue
        if ref := row.params.get(REFERENCE_SCAN):
            out.setdefault(str(ref), row.id)
        if protocol := row.params.get(REFERENCE_PROTOCOL):
            by_protocol.setdefault((row.patient_id, row.study_uid, str(protocol)), row.id)
    if by_protocol:
        for record in records:
            job_id = by_protocol.get((record.patient_id, record.study_uid, record.protocol))
            if job_id is not None:
                out.setdefault(record.scan_id, job_id)
    return out


def _why_not_raw(record: ScanRecord, rows: list[_JobRow], cutoff: float) -> tuple[str, float]:
    """('' or why the scan's raw data is not due, when its last job ended)."""
    if record.state is ScanState.RECEIVING:
        return "still receiving", 0.0
    if record.raw_purged_at is not None:
        return "raw data deleted already", 0.0
    if not rows:
        if record.state is ScanState.COMPLETE:
            return "complete without a job (the reconciler queues it)", 0.0
        ended = float(record.completed_at or record.created_at)  # cut off, its job never recorded
    elif active := [r for r in rows if not r.ended]:
        return f"job {active[0].id} is {active[0].state.value if active[0].state else 'unknown'}", 0.0
    else:
        ended = max(r.ended_at or 0.0 for r in rows)
    return ("" if ended <= cutoff else "a job on it ended since"), ended


# --- the plan -------------------------------------------------------------------------------------------

def plan_purge(settings: Settings, scans: ScanStore, jobs: JobStore, now: float) -> PurgePlan:
    """What is due for deletion at ``now`` (epoch seconds) under ``settings``' ``keep_*``; reads the scans'
    records on disk and the job records, writes nothing. Raises redis.RedisError."""
    plan = PurgePlan(now, settings.keep_raw_days, settings.keep_results_days, settings.keep_jobs_days)
    if plan.off:
        return plan
    records = {r.scan_id: r for r in scans.scans()}
    rows = _job_rows(jobs)
    by_scan: dict[str, list[_JobRow]] = {}
    for row in rows:
        by_scan.setdefault(row.scan_id, []).append(row)
    referenced = _referenced(rows, records.values())
    raw_gone: set[str] = set()
    if plan.keep_raw_days:
        for record in records.values():
            why, ended = _why_not_raw(record, by_scan.get(record.scan_id, []), plan.cutoff(Kind.RAW))
            if why:
                continue
            if record.scan_id in referenced:
                plan.referenced.append(record.scan_id)
                continue
            raw = scans.raw_path(record.scan_id)
            plan.items.append(PurgeItem(Kind.RAW, record.scan_id, record.scan_id, _size_of(raw),
                                        (now - ended) / DAY_S, ended))
            raw_gone.add(record.scan_id)
    results: dict[str, set[Path]] = {}  # scan id -> result files due
    if plan.keep_results_days:
        for row in rows:
            if not row.ended or row.scan_id not in records or (row.ended_at or 0.0) > plan.cutoff(Kind.RESULTS):
                continue
            files = scans.job_result_files(row.scan_id, row.id)
            if files:
                results.setdefault(row.scan_id, set()).update(files)
                plan.items.append(PurgeItem(Kind.RESULTS, row.id, row.scan_id, sum(map(_size_of, files)),
                                            (now - (row.ended_at or 0.0)) / DAY_S, row.ended_at or 0.0,
                                            tuple(scans.stored(f) for f in files)))
    for scan_id, record in records.items():
        no_raw = scan_id in raw_gone or record.raw_purged_at is not None
        if no_raw and set(scans.result_files(scan_id)) <= results.get(scan_id, set()):
            plan.folders.append(scan_id)
    if plan.keep_jobs_days:
        # A job record is what says a retrieval that its images were deleted (results_purged_at). An exam's
        # (patient, study, protocol) records therefore go all together or not at all, oldest first: were the
        # newest scan's records gone and an older scan's left, a retrieval would take the older scan's images
        # for the exam's newest.
        gone = set(plan.folders)
        exams: dict[tuple[str, str, str], list[_JobRow]] = {}
        for row in rows:  # a record without a patient or study: no retrieval matches it, it goes alone
            exams.setdefault(row.exam if row.patient_id and row.study_uid else ("", "", row.id), []).append(row)
        for exam_rows in exams.values():
            due = [row for row in exam_rows if row.ended and (row.ended_at or 0.0) <= plan.cutoff(Kind.JOB) and (
                row.scan_id in gone or (row.scan_id not in records and not _folder_exists(scans, row.scan_id)))]
            if len(due) < len(exam_rows):
                continue
            for row in sorted(due, key=lambda r: (r.ended_at or 0.0, r.id)):
                plan.items.append(PurgeItem(Kind.JOB, row.id, row.scan_id, 0, (now - (row.ended_at or 0.0)) / DAY_S,
                                            row.ended_at or 0.0))
    return plan


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _folder_exists(scans: ScanStore, scan_id: str) -> bool:
    try:
        return scans.folder(scan_id).exists()
    except ValueError:  # not a scan id: no folder can be its
        return False


# --- applying it ----------------------------------------------------------------------------------------

class _Applying:
    """One plan being applied: each item checked again just before it is deleted."""

    def __init__(self, plan: PurgePlan, scans: ScanStore, jobs: JobStore, keep_alive: Callable[[], bool]) -> None:
        self.plan, self.scans, self.jobs, self.keep_alive = plan, scans, jobs, keep_alive
        self.report = PurgeReport(False, plan.now, _keep_days(plan), referenced=list(plan.referenced))
        # read again now: a job that names one of these scans as its reference may have been queued since the plan
        self.records = list(scans.scans())
        self.referenced = _referenced(_job_rows(jobs), self.records)

    def run(self) -> PurgeReport:
        steps: list[tuple[Kind | None, Any]] = [(Kind.RESULTS, i) for i in self.plan.of(Kind.RESULTS)]
        steps += [(Kind.RAW, i) for i in self.plan.of(Kind.RAW)]
        steps += [(None, scan_id) for scan_id in self.plan.folders]
        steps += [(Kind.JOB, group) for group in self._exams(self.plan.of(Kind.JOB))]
        for kind, what in steps:
            if not self.keep_alive():
                self.report.skipped = ("the purge lock was lost (another purge may run), or the data root is no longer "
                                       "the recorded one: stopped part-way")
                log.error("retention: %s", self.report.skipped)
                break
            try:
                if kind is None:
                    self._folder(what)
                elif kind is Kind.JOB:
                    self._exam_records(what)
                else:
                    {Kind.RESULTS: self._results, Kind.RAW: self._raw}[kind](what)
            except (OSError, ScanBusy) as e:  # a file that cannot be deleted, a busy scan: the next round tries
                ids = [what] if kind is None else [i.id for i in what[1]] if kind is Kind.JOB else [what.id]
                label = f"scan folder {what}" if kind is None else f"{(kind or Kind.RAW).value} {', '.join(ids)}"
                log.warning("retention: %s not deleted: %s", label, e)
                self.report.kept += [Kept(kind or Kind.RAW, i, f"not deleted: {e}") for i in ids]
        self.scans.sweep_removed()
        self._unindex_purged()
        return self.report

    def _unindex_purged(self) -> None:
        """Take out of the scan index the scans whose raw data is gone that are still in it (a rebuild of the
        index that read their records just before they were marked may have put them back)."""
        purged = {r.scan_id for r in self.records if r.raw_purged_at is not None}
        for scan_id in purged & set(self.jobs.redis.hkeys(SCANS_INDEXED)):
            scanindex.forget(self.jobs.redis, scan_id)

    def _keep(self, item: PurgeItem, why: str) -> None:
        log.info("retention: %s %s kept: %s", item.kind.value, item.id, why)
        self.report.kept.append(Kept(item.kind, item.id, why))

    def _results(self, item: PurgeItem) -> None:
        job = self.jobs.get(item.id)
        ended_at = (job.finished_at or job.created_at) if job is not None else 0.0
        if job is None or not job.state.finished or ended_at > self.plan.cutoff(Kind.RESULTS):
            self._keep(item, "the job is not ended, or ended since the plan" if job else "the job record is gone")
            return
        freed = sum(self.scans.delete_file(self.scans.resolve(f)) for f in item.files)
        self.jobs.update(item.id, results_purged_at=self.plan.now, result_path="")
        self.jobs.log(item.id, f"result files deleted by retention ({len(item.files)} file(s), {_size(freed)})")
        self.report.items.append(dataclasses.replace(item, bytes=freed))
        log.info("retention: results of job %s deleted (%d file(s), %s)", item.id, len(item.files), _size(freed))

    def _scan_why_not(self, scan_id: str, cutoff: float) -> str:
        """'' if the scan's raw data may go now, else why not (its record and jobs read now)."""
        try:
            record = self.scans.load(scan_id)
        except FileNotFoundError:
            return "the scan is gone"
        why, _ended = _why_not_raw(record, _rows_of_scan(self.jobs, scan_id), cutoff)
        if not why and scan_id in self.referenced:
            why = f"job {self.referenced[scan_id]} uses it as reference scan"
        return why

    def _raw(self, item: PurgeItem) -> None:
        with scan_guard(self.jobs.redis, item.id):  # no staff action makes or queues a job on it meanwhile
            self._raw_guarded(item)

    def _raw_guarded(self, item: PurgeItem) -> None:
        cutoff = self.plan.cutoff(Kind.RAW)
        if why := self._scan_why_not(item.id, cutoff):
            self._keep(item, why)
            return
        record = self.scans.load(item.id)
        before = dataclasses.replace(record)
        when = time.strftime("%Y-%m-%d", time.gmtime(self.plan.now))
        record.state, record.raw_purged_at = ScanState.INCOMPLETE, self.plan.now
        record.error = f"{record.error}; " if record.error else ""
        record.error += f"raw data deleted by retention on {when}"
        self.scans.save(record)  # from here no retro-recon, index entry or reference takes the scan
        scanindex.forget(self.jobs.redis, item.id)
        # a retro-recon (or a retry) that took the scan before the record changed: its job is seen now
        why, _ended = _why_not_raw(before, _rows_of_scan(self.jobs, item.id), cutoff)
        if why:
            self.scans.save(before)
            scanindex.record_scan(self.jobs.redis, before)
            self._keep(item, why)
            return
        freed = self.scans.delete_raw(item.id)
        for job_id in self.jobs.jobs_for_scan(item.id):
            self.jobs.update(job_id, raw_purged_at=self.plan.now)
            self.jobs.log(job_id, "the scan's raw data deleted by retention")
        self.report.items.append(dataclasses.replace(item, bytes=freed))
        log.info("retention: raw data of scan %s deleted (%s, its last job ended %.1f days ago)", item.id,
                 _size(freed), item.age_days)

    def _folder(self, scan_id: str) -> None:
        try:
            record = self.scans.load(scan_id)
        except FileNotFoundError:
            return
        if record.raw_purged_at is None or self.scans.raw_path(scan_id).exists() or self.scans.result_files(scan_id):
            return  # its raw data kept (a re-check said so), or results left: the folder stays
        if active := [r for r in _rows_of_scan(self.jobs, scan_id) if not r.ended]:
            log.info("retention: folder of scan %s kept: job %s has not ended", scan_id, active[0].id)
            return
        freed = self.scans.remove_scan(scan_id)
        scanindex.forget(self.jobs.redis, scan_id)
        self.report.folders_removed.append(scan_id)
        log.info("retention: folder of scan %s removed (%s)", scan_id, _size(freed))

    def _exams(self, items: list[PurgeItem]) -> list[tuple[str, list[PurgeItem]]]:
        """The job records due, by exam: ``(its exam index key, its records)``; a record without a patient or
        study goes alone, with key '' (no retrieval matches it)."""
        groups: dict[str, list[PurgeItem]] = {}
        for item in items:
            job = self.jobs.get(item.id)
            key = exam_key(job.patient_id, job.study_uid, job.protocol) if (
                job is not None and job.patient_id and job.study_uid) else ""
            groups.setdefault(key or f"job {item.id}", []).append(item)
        return [(key if key.startswith(EXAM_INDEX) else "", group) for key, group in groups.items()]

    def _exam_records(self, exam: tuple[str, list[PurgeItem]]) -> None:
        """One exam's job records: all of its records read again now, deleted oldest first (the exam's own
        order, as a retrieval ranks them), and none newer than one kept. Were a newer scan's records gone and
        an older scan's left, a retrieval would take the older acquisition for the exam's newest."""
        key, group = exam
        due = {item.id: item for item in group}
        if key:
            members = self.jobs.redis.zrange(key, 0, -1)
            members = [m for m in members if self.jobs.redis.exists(JOB_KEY + m)]
            if others := [m for m in members if m not in due]:
                for item in group:
                    self._keep(item, f"job {others[0]} of the same exam is kept: an exam's records go together")
                return
            ordered = [due[m] for m in members]
        else:
            ordered = group
        for n, item in enumerate(ordered):
            if not self._job(item):
                for newer in ordered[n + 1:]:
                    self._keep(newer, f"an older record of its exam ({item.id}) is kept")
                return

    def _job(self, item: PurgeItem) -> bool:
        if _folder_exists(self.scans, item.scan_id):
            self._keep(item, f"its scan {item.scan_id} is still on disk")
            return False
        if not self.jobs.delete(item.id, ended_before=self.plan.cutoff(Kind.JOB)):
            self._keep(item, "the job is not ended, or ended since the plan, or is gone")
            return False
        self.report.items.append(item)
        log.info("retention: record of job %s deleted (ended %.1f days ago)", item.id, item.age_days)
        return True


def _keep_days(plan: PurgePlan) -> dict[str, float]:
    return {"keep_raw_days": plan.keep_raw_days, "keep_results_days": plan.keep_results_days,
            "keep_jobs_days": plan.keep_jobs_days}


def apply_purge(plan: PurgePlan, scans: ScanStore, jobs: JobStore,
                keep_alive: Callable[[], bool] | None = None) -> PurgeReport:
    """Delete what ``plan`` lists, each item checked again just before (see the module doc); what changed
    since is kept and said in the report. ``keep_alive``: called before each item, False stops (the purge's
    lock was lost). Raises redis.RedisError (what was done stays done: a later round goes on)."""
    if plan.off:
        return PurgeReport(False, plan.now, _keep_days(plan))
    return _Applying(plan, scans, jobs, keep_alive or (lambda: True)).run()


def planned(plan: PurgePlan) -> PurgeReport:
    """The report of a dry run: what ``plan`` would delete."""
    return PurgeReport(True, plan.now, _keep_days(plan), items=list(plan.items), folders_removed=list(plan.folders),
                       referenced=list(plan.referenced))


# --- one purge at a time --------------------------------------------------------------------------------

class Lease:
    """A lock in Redis (``SET NX PX`` with a token; renewed and released only by its holder, by
    ``purge_lock.lua``): one purge over a shared data root, one purge-or-action on a scan."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float) -> None:
        self.client, self.key, self.ttl_ms = client, key, int(ttl_s * 1000)
        self.token = secrets.token_hex(16)
        self._script = load_script(client, "reconq.scheduler", "purge_lock")
        self._renewed = 0.0

    def acquire(self) -> bool:
        self._renewed = time.monotonic()
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        """Keep the lock (at most every few seconds); False if it is no longer this holder's."""
        if time.monotonic() - self._renewed < _RENEW_EVERY_S:
            return True
        self._renewed = time.monotonic()
        return bool(self._script(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self._script(keys=[self.key], args=[self.token, 0])

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """True inside while this holder has the lock; False where another has it."""
        if not self.acquire():
            yield False
            return
        try:
            yield True
        finally:
            self.release()


def purge_lock(client: redis.Redis) -> Lease:
    """The lock one purge holds over a shared data root, renewed as it goes."""
    return Lease(client, PURGE_LOCK, PURGE_LOCK_TTL_S)


#: How long a scan's guard lives: retention's "mark the scan purged, read its jobs, delete or put it back"
#: and a staff action's "make or queue a job on it, read the scan" run one at a time per scan, so either the
#: purge sees the job (and keeps the scan) or the action sees the purge (and fails its job, saying why).
SCAN_GUARD_TTL_S = 60.0


class ScanBusy(Exception):
    """The scan's guard was not had in time."""


@contextlib.contextmanager
def scan_guard(client: redis.Redis, scan_id: str, wait_s: float = 30.0) -> Iterator[None]:
    """Hold ``scan_id``'s guard inside (waiting up to ``wait_s`` for another holder); :class:`ScanBusy`
    where it is not had in time."""
    lease = Lease(client, SCAN_GUARD + scan_id, SCAN_GUARD_TTL_S)
    deadline = time.monotonic() + wait_s
    while not lease.acquire():
        if time.monotonic() > deadline:
            raise ScanBusy(f"scan {scan_id} is busy (a purge or another action holds it); try again")
        time.sleep(0.05)
    try:
        yield
    finally:
        lease.release()


# --- the entry point ------------------------------------------------------------------------------------

def run_purge(settings: Settings, client: redis.Redis, *, dry_run: bool, now: float | None = None) -> PurgeReport:
    """Apply the ``keep_*`` settings now (``dry_run``: only list what is due): the CLI's ``reconq purge`` and
    the gateway's periodic purge. ``client``: Redis with ``decode_responses=True``; ``now``: epoch seconds
    (default: the clock). Nothing is deleted while another purge holds the lock (the report says so).

    Raises :class:`reconq.core.dataroot.DataRootError` where ``settings.data_dir`` is not the data root Redis
    records (an unmounted share would make every job's scan look gone), and redis.RedisError."""
    now = time.time() if now is None else now
    keep = {"keep_raw_days": settings.keep_raw_days, "keep_results_days": settings.keep_results_days,
            "keep_jobs_days": settings.keep_jobs_days}
    if not retention_on(settings):
        return PurgeReport(dry_run, now, keep)
    check_data_root(settings, client, create=False, role="purge")
    scans, jobs = ScanStore(Path(settings.data_dir)), JobStore(client)
    if dry_run:
        report = planned(plan_purge(settings, scans, jobs, now))
    else:
        lock = purge_lock(client)
        with lock.held() as mine:
            if not mine:
                report = PurgeReport(False, now, keep, skipped="another purge is running (it holds the purge lock)")
                log.info("retention: %s; this round skipped", report.skipped)
                return report
            checked = [time.monotonic()]

            def still_ours() -> bool:
                """The lock still held and the data root still the recorded one (a share unmounted part-way
                would make every scan folder look gone, and their job records due), looked at every few s."""
                if not lock.renew():
                    return False
                if time.monotonic() - checked[0] < _ROOT_CHECK_S:
                    return True
                checked[0] = time.monotonic()
                try:
                    check_data_root(settings, client, create=False, role="purge")
                except DataRootError as e:
                    log.error("retention: stopped part-way: %s", e)
                    return False
                return True

            report = apply_purge(plan_purge(settings, scans, jobs, now), scans, jobs, keep_alive=still_ours)
    t = report.totals()
    log.info("retention%s: %d raw scan(s) (%s), %d result file(s) (%s), %d job record(s), %d folder(s) %s; %d kept "
             "as changed since the plan", " (dry run)" if dry_run else "", t["raw"]["count"], _size(t["raw"]["bytes"]),
             t["results"]["files"], _size(t["results"]["bytes"]), t["job"]["count"], len(report.folders_removed),
             "would be deleted" if dry_run else "deleted", len(report.kept))
    return report
