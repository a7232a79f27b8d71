"""Retention on real parts: a real redis-server, scan folders and files on disk, the gateway's own purge thread.

Ages come from the job records (``finished_at`` days ago), never from sleeping.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from reconq.core.constants import JOB_KEY, JOBS_INDEX, REFERENCE_PROTOCOL, REFERENCE_SCAN, SCAN_JOBS, SCANS_INDEXED
from reconq.core.dataroot import DataRootError
from reconq.core.jobs import Job, JobStore, exam_key
from reconq.core.results import result_file
from reconq.core.settings import Settings
from reconq.core.states import JobState
from reconq.core.storage import ScanRecord, ScanState, ScanStore
from reconq.gateway import client as mrd
from reconq.gateway import server
from reconq.gateway.server import Gateway
from reconq.scheduler import exams, scanindex
from reconq.scheduler.retention import PURGE_LOCK, Kind, apply_purge, plan_purge, run_purge

DAY = 86400.0
RAW_BYTES, RESULT_BYTES = 4000, 1500
PATIENT, STUDY = "RET-P1", "1.2.826.0.1.3680043.2.1125.99"


@pytest.fixture
def scans(settings: Settings) -> ScanStore:
    return ScanStore(settings.data_dir)


@pytest.fixture
def client(store: JobStore) -> redis.Redis:
    return store.redis


def keep(settings: Settings, raw: float = 0, results: float = 0, jobs: float = 0) -> Settings:
    return settings.model_copy(update={"keep_raw_days": raw, "keep_results_days": results, "keep_jobs_days": jobs})


def add_scan(scans: ScanStore, client: redis.Redis, scan_id: str, state: ScanState = ScanState.COMPLETE,
             protocol: str = "t1", patient: str = PATIENT) -> ScanRecord:
    """A scan folder with a raw file of RAW_BYTES and its record, in the scan index when complete."""
    record = ScanRecord(scan_id=scan_id, state=state, pipeline="cartesian", patient_id=patient, study_uid=STUDY,
                        protocol=protocol, completed_at=time.time() - 40 * DAY)
    scans.create(record)
    scans.raw_path(scan_id).write_bytes(b"\0" * RAW_BYTES)
    scanindex.record_scan(client, record)
    return record


def add_job(store: JobStore, scans: ScanStore, record: ScanRecord, n: int = 1, state: JobState = JobState.DONE,
            ended_days_ago: float = 10.0, params: dict | None = None, result: bool = True) -> Job:
    """A job on ``record``'s scan; an ended one ``ended_days_ago``, with a result file of RESULT_BYTES if done."""
    ended = state.finished
    job = Job(id=f"{record.scan_id}-j{n}", scan_id=record.scan_id, pipeline="cartesian", params=params or {},
              state=state, attempts=1, patient_id=record.patient_id, study_uid=record.study_uid,
              protocol=record.protocol, created_at=time.time() - (ended_days_ago + 1) * DAY,
              finished_at=time.time() - ended_days_ago * DAY if ended else None)
    if state is JobState.DONE and result:
        path = result_file(scans, job)
        path.write_bytes(b"\1" * RESULT_BYTES)
        job.result_path = scans.stored(path)
    assert store.create(job)
    return job


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# --- what goes ------------------------------------------------------------------------------------------

def test_a_finished_old_scan_loses_its_raw_data_and_keeps_results_kept_longer(settings, scans, store, client):
    old, recent = add_scan(scans, client, "S-old"), add_scan(scans, client, "S-recent")
    old_job = add_job(store, scans, old, ended_days_ago=10)
    add_job(store, scans, recent, ended_days_ago=2)

    report = run_purge(keep(settings, raw=7), client, dry_run=False)

    assert [(i.kind, i.id, i.bytes) for i in report.items] == [(Kind.RAW, "S-old", RAW_BYTES)]
    assert 9.9 < report.items[0].age_days < 10.1
    assert not scans.raw_path("S-old").exists() and scans.raw_path("S-recent").exists()
    assert result_file(scans, old_job).exists()  # results kept forever (keep_results_days 0)
    record = scans.load("S-old")
    assert record.state is ScanState.INCOMPLETE and record.raw_purged_at is not None
    assert "deleted by retention" in (record.error or "")
    assert client.hget(SCANS_INDEXED, "S-old") is None and client.hget(SCANS_INDEXED, "S-recent") is not None
    assert scanindex.newest(client, PATIENT, STUDY, "t1").scan_id == "S-recent"
    assert store.get(old_job.id).raw_purged_at is not None
    assert store.get(old_job.id).result_path  # its images are still there
    assert report.lines()[0].startswith("deleted 1 raw scan (4.0 kB), 0 result files (0 B), 0 job records")
    assert json.loads(json.dumps(report.as_dict()))["totals"]["raw"] == {"count": 1, "files": 1, "bytes": RAW_BYTES}


def test_with_results_due_too_the_whole_scan_folder_goes(settings, scans, store, client):
    job = add_job(store, scans, add_scan(scans, client, "S-all"), ended_days_ago=10)

    report = run_purge(keep(settings, raw=7, results=7), client, dry_run=False)

    assert sorted((i.kind.value, i.id) for i in report.items) == [("raw", "S-all"), ("results", job.id)]
    assert report.folders_removed == ["S-all"] and not scans.folder("S-all").exists()
    assert report.totals()["results"] == {"count": 1, "files": 1, "bytes": RESULT_BYTES}
    kept = store.get(job.id)  # keep_jobs_days 0: the record stays, saying what went
    assert kept.results_purged_at is not None and kept.raw_purged_at is not None and kept.result_path == ""
    assert not list(scans.root.glob(".removed-*"))


@pytest.mark.parametrize("state", [JobState.RECEIVING, JobState.QUEUED, JobState.WAITING_INPUTS, JobState.RUNNING])
def test_a_scan_with_a_job_not_ended_is_untouched(settings, scans, store, client, state):
    record = add_scan(scans, client, "S-busy")
    add_job(store, scans, record, n=1, ended_days_ago=30)
    retro = add_job(store, scans, record, n=2, state=state)
    before = files_under(scans.root)

    report = run_purge(keep(settings, raw=1, jobs=1), client, dry_run=False)

    assert report.items == [] and files_under(scans.root) == before
    assert scans.load("S-busy").state is ScanState.COMPLETE and store.get(retro.id) is not None


def test_a_scan_still_receiving_is_untouched(settings, scans, store, client):
    record = add_scan(scans, client, "S-recv", state=ScanState.RECEIVING)
    add_job(store, scans, record, state=JobState.FAILED, ended_days_ago=30)  # even with an old ended job on it

    assert run_purge(keep(settings, raw=1), client, dry_run=False).items == []
    assert scans.raw_path("S-recv").exists()


@pytest.mark.parametrize("how", ["by id", "by protocol"])
def test_a_reference_scan_used_by_a_waiting_job_is_untouched(settings, scans, store, client, how):
    ref = add_scan(scans, client, "S-ref", protocol="coilref")
    add_job(store, scans, ref, ended_days_ago=30)
    other = add_scan(scans, client, "S-other", protocol="sense_t1")
    add_job(store, scans, other, ended_days_ago=30)
    params = {REFERENCE_SCAN: "S-ref"} if how == "by id" else {REFERENCE_PROTOCOL: "coilref"}
    add_job(store, scans, other, n=2, state=JobState.WAITING_INPUTS, params=params)

    report = run_purge(keep(settings, raw=7), client, dry_run=False)

    assert report.items == [] and report.referenced == ["S-ref"]
    assert scans.raw_path("S-ref").exists() and scans.load("S-ref").state is ScanState.COMPLETE
    assert any("reference scan" in line for line in report.lines())


def test_another_patients_scan_of_the_reference_protocol_is_not_protected(settings, scans, store, client):
    add_job(store, scans, add_scan(scans, client, "S-theirs", protocol="coilref", patient="RET-P2"), ended_days_ago=30)
    waiting = add_scan(scans, client, "S-mine", protocol="sense_t1")
    add_job(store, scans, waiting, state=JobState.WAITING_INPUTS, params={REFERENCE_PROTOCOL: "coilref"})

    report = run_purge(keep(settings, raw=7), client, dry_run=False)
    assert [i.id for i in report.items] == ["S-theirs"]


def test_a_dry_run_deletes_nothing_and_lists_what_the_run_deletes(settings, scans, store, client):
    for n, days in enumerate((30, 12, 3)):  # each its own protocol: an exam's records go together
        add_job(store, scans, add_scan(scans, client, f"S-dry{n}", protocol=f"t1_dry{n}"), ended_days_ago=days)
    gone = add_scan(scans, client, "S-dry-gone", protocol="t1_gone")
    add_job(store, scans, gone, ended_days_ago=30)
    scans.remove_scan("S-dry-gone")  # its files gone already: its record is due
    policy = keep(settings, raw=10, results=20, jobs=20)
    files, keys = files_under(scans.root), sorted(client.scan_iter("reconq:*"))

    dry = run_purge(policy, client, dry_run=True)

    assert files_under(scans.root) == files and sorted(client.scan_iter("reconq:*")) == keys
    assert dry.lines()[0].startswith("would delete 2 raw scans (8.0 kB), 1 result file (1.5 kB), 2 job records")
    real = run_purge(policy, client, dry_run=False)
    assert sorted((i.kind, i.id, i.bytes) for i in real.items) == sorted((i.kind, i.id, i.bytes) for i in dry.items)
    assert real.folders_removed == dry.folders_removed == ["S-dry0"]
    assert real.totals() == dry.totals() and real.lines()[0].startswith("deleted 2 raw scans")


def test_job_records_go_once_their_scans_files_are_gone(settings, scans, store, client):
    job = add_job(store, scans, add_scan(scans, client, "S-rec"), ended_days_ago=10)

    report = run_purge(keep(settings, raw=7, results=7, jobs=7), client, dry_run=False)

    assert sorted(i.kind.value for i in report.items) == ["job", "raw", "results"]
    assert store.get(job.id) is None and not client.exists(JOB_KEY + job.id)
    assert client.zscore(JOBS_INDEX, job.id) is None and not client.exists(SCAN_JOBS + "S-rec")
    assert client.zscore(exam_key(PATIENT, STUDY, "t1"), job.id) is None
    assert store.log_lines(job.id) == [] and store.actions(job.id) == []


def test_with_raw_kept_forever_job_records_stay_however_old(settings, scans, store, client):
    """A complete scan on disk without its job would be queued again by the reconciler: records outlive no file."""
    job = add_job(store, scans, add_scan(scans, client, "S-keep"), ended_days_ago=100)

    report = run_purge(keep(settings, results=7, jobs=7), client, dry_run=False)

    assert [(i.kind, i.id) for i in report.items] == [(Kind.RESULTS, job.id)]
    kept = store.get(job.id)
    assert kept is not None and kept.results_purged_at is not None and kept.result_path == ""
    assert scans.raw_path("S-keep").exists() and not result_file(scans, job).exists()
    again = run_purge(keep(settings, results=7, jobs=7), client, dry_run=False)  # nothing more is due
    assert again.items == [] and again.lines()[0].startswith("nothing is due")


def test_lookups_say_the_images_are_gone_after_a_purge(settings, scans, store, client,
                                                       start_gateway: Callable[..., Gateway]):
    results_gone = add_job(store, scans, add_scan(scans, client, "S-look1", protocol="t1_look"), ended_days_ago=10)
    record_gone = add_job(store, scans, add_scan(scans, client, "S-look2", protocol="t2_look"), ended_days_ago=40)
    run_purge(keep(settings, results=7), client, dry_run=False)  # S-look1's images
    run_purge(keep(settings, raw=30, results=30, jobs=30), client, dry_run=False)  # S-look2 whole
    assert store.get(results_gone.id).results_purged_at is not None and store.get(record_gone.id) is None

    day = exams.exams_of_day(store, client, 0.0, time.time() + DAY, time.time())
    series = {s.job_id: s for e in day for s in e.series}
    assert record_gone.id not in series and series[results_gone.id].state == "done"

    host, port = start_gateway().address
    back = mrd.retrieve(host, port, mrd.retrieval_header(PATIENT, STUDY, "t1_look"), timeout=30)
    assert back.closed and not back.images
    assert any(t.startswith("ERR") and f"the images of job {results_gone.id} were deleted by retention on " in t
               and "reconstruct it again" in t for t in back.texts), back.texts
    back = mrd.retrieve(host, port, mrd.retrieval_header(PATIENT, STUDY, "t2_look"), timeout=30)
    assert back.closed and any(t.startswith("WRN") and "no reconstruction found" in t for t in back.texts)


# --- checked again before each deletion --------------------------------------------------------------------

def test_a_retro_recon_queued_between_plan_and_apply_keeps_the_scan(settings, scans, store, client):
    record = add_scan(scans, client, "S-race")
    add_job(store, scans, record, ended_days_ago=10)
    policy = keep(settings, raw=7)
    plan = plan_purge(policy, scans, store, time.time())
    assert [i.id for i in plan.of(Kind.RAW)] == ["S-race"]

    add_job(store, scans, record, n=2, state=JobState.QUEUED)  # a retro-recon, after the plan
    report = apply_purge(plan, scans, store)

    assert report.items == [] and [(k.kind, k.id) for k in report.kept] == [(Kind.RAW, "S-race")]
    assert "queued" in report.kept[0].why
    assert scans.raw_path("S-race").exists() and scans.load("S-race").state is ScanState.COMPLETE


def test_a_job_naming_the_scan_as_reference_after_the_plan_keeps_it(settings, scans, store, client):
    add_job(store, scans, add_scan(scans, client, "S-ref2", protocol="coilref"), ended_days_ago=10)
    plan = plan_purge(keep(settings, raw=7), scans, store, time.time())
    later = add_scan(scans, client, "S-new")
    add_job(store, scans, later, state=JobState.QUEUED, params={REFERENCE_SCAN: "S-ref2"})

    report = apply_purge(plan, scans, store)
    assert report.items == [] and "reference" in report.kept[0].why and scans.raw_path("S-ref2").exists()


def test_a_retro_recon_that_took_the_scan_as_its_record_changed_keeps_it(settings, store, client):
    """The raw file's deletion is the last step: the record marked, then the scan's jobs read once more."""

    class RetroMeanwhile(ScanStore):
        def save(self, record: ScanRecord) -> None:
            super().save(record)
            if record.raw_purged_at is not None and not store.get(f"{record.scan_id}-j2"):
                add_job(store, self, self.load(record.scan_id), n=2, state=JobState.QUEUED)

    scans = RetroMeanwhile(settings.data_dir)
    add_job(store, scans, add_scan(scans, client, "S-late"), ended_days_ago=10)

    report = apply_purge(plan_purge(keep(settings, raw=7), scans, store, time.time()), scans, store)

    assert report.items == [] and scans.raw_path("S-late").exists()
    assert scans.load("S-late").state is ScanState.COMPLETE and scans.load("S-late").raw_purged_at is None
    assert client.hget(SCANS_INDEXED, "S-late") is not None  # back in the scan index


def test_a_staff_retry_after_the_plan_keeps_the_job_record(settings, scans, store, client):
    job = add_job(store, scans, add_scan(scans, client, "S-retry"), state=JobState.FAILED, ended_days_ago=10)
    scans.remove_scan("S-retry")
    plan = plan_purge(keep(settings, jobs=7), scans, store, time.time())
    assert [(i.kind, i.id) for i in plan.items] == [(Kind.JOB, job.id)]
    assert store.set_state(job.id, JobState.QUEUED, queued_at=time.time())

    report = apply_purge(plan, scans, store)
    assert report.items == [] and store.get(job.id).state is JobState.QUEUED


# --- off, busy, and the wrong data root --------------------------------------------------------------------

def test_with_every_keep_setting_0_nothing_happens_and_the_report_says_so(settings, scans, store, client):
    add_job(store, scans, add_scan(scans, client, "S-off"), ended_days_ago=1000)

    for dry_run in (True, False):
        report = run_purge(settings, client, dry_run=dry_run)
        assert report.off and report.items == [] and "retention is off" in report.lines()[0]
        assert report.as_dict()["off"] is True
    assert scans.raw_path("S-off").exists()


def test_a_purge_while_another_holds_the_lock_deletes_nothing(settings, scans, store, client):
    add_job(store, scans, add_scan(scans, client, "S-lock"), ended_days_ago=10)
    client.set(PURGE_LOCK, "another gateway", px=60_000)

    report = run_purge(keep(settings, raw=7), client, dry_run=False)

    assert report.items == [] and "another purge" in report.skipped and scans.raw_path("S-lock").exists()
    assert client.get(PURGE_LOCK) == "another gateway"  # not released by the one that did not hold it
    client.delete(PURGE_LOCK)
    assert [i.id for i in run_purge(keep(settings, raw=7), client, dry_run=False).items] == ["S-lock"]
    assert client.get(PURGE_LOCK) is None  # released after the round


def test_a_data_dir_that_is_not_the_recorded_root_is_refused(settings, tmp_path, client):
    """An unmounted share would make every job's scan look gone: nothing is planned there."""
    elsewhere = keep(settings, raw=1, jobs=1).model_copy(update={"data_dir": tmp_path / "empty"})
    with pytest.raises(DataRootError):
        run_purge(elsewhere, client, dry_run=True)


# --- the gateway's periodic purge --------------------------------------------------------------------------

def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_the_gateway_purges_every_interval(settings, scans, store, client, start_gateway):
    add_job(store, scans, add_scan(scans, client, "S-gw1"), ended_days_ago=3)
    gateway = start_gateway(keep_raw_days=1, purge_interval_s=0.2)

    assert wait_for(lambda: not scans.raw_path("S-gw1").exists())
    add_job(store, scans, add_scan(scans, client, "S-gw2"), ended_days_ago=3)  # the next round takes it
    assert wait_for(lambda: not scans.raw_path("S-gw2").exists())
    assert gateway.fatal is None and gateway.address[1] > 0


def test_a_failed_purge_round_does_not_stop_the_gateways_purges(settings, start_gateway, monkeypatch, caplog):
    calls: list[bool] = []

    def flaky(settings: Settings, client: redis.Redis, *, dry_run: bool) -> None:
        calls.append(dry_run)
        if len(calls) == 1:
            raise redis.ConnectionError("Redis went away")
        if len(calls) == 2:
            raise OSError("stale file handle")

    monkeypatch.setattr(server, "run_purge", flaky)
    start_gateway(keep_jobs_days=1, purge_interval_s=0.1)

    assert wait_for(lambda: len(calls) >= 3) and calls[:3] == [False, False, False]
    assert "purge skipped this round (Redis went away)" in caplog.text and "purge failed" in caplog.text


def test_a_gateway_with_retention_off_starts_no_purge(settings, start_gateway, monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(server, "run_purge", lambda *a, **k: calls.append(True))
    start_gateway(purge_interval_s=0.05)
    time.sleep(0.5)
    assert calls == []


def test_a_purged_scan_put_back_in_the_scan_index_is_taken_out_again(settings, scans, store, client):
    """A rebuild of the index that read the scan's record just before it was marked may put it back."""
    add_job(store, scans, add_scan(scans, client, "S-idx"), ended_days_ago=10)
    run_purge(keep(settings, raw=7), client, dry_run=False)
    digest = scanindex.scan_digest(PATIENT, STUDY, "t1")
    client.zadd(f"reconq:scanidx:{digest}", {"S-idx": 1.0})
    client.hset(SCANS_INDEXED, "S-idx", json.dumps({"digest": digest, "completed_at": 1.0}))

    run_purge(keep(settings, raw=7), client, dry_run=False)
    assert client.hget(SCANS_INDEXED, "S-idx") is None and scanindex.newest(client, PATIENT, STUDY, "t1") is None


def test_a_scan_folder_left_half_removed_is_swept(settings, scans, store, client):
    add_job(store, scans, add_scan(scans, client, "S-half"), ended_days_ago=1)
    (scans.root / ".removed-S-gone" / "results").mkdir(parents=True)  # a purge stopped mid-way
    (scans.root / ".removed-S-gone" / "raw.h5").write_bytes(b"\0" * 10)

    run_purge(keep(settings, raw=7), client, dry_run=False)
    assert not (scans.root / ".removed-S-gone").exists() and scans.raw_path("S-half").exists()
    assert [r.scan_id for r in scans.scans()] == ["S-half"]


def test_reconq_purge_dry_run_then_for_real(settings, scans, store, client):
    """`reconq purge` as a command: one-line summary, --json report, --dry-run deleting nothing."""
    import os
    import subprocess
    import sys

    old = add_scan(scans, client, "20260101T000000-cli00001")
    add_job(store, scans, old, ended_days_ago=30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
    env.update(RECONQ_DATA_DIR=str(settings.data_dir), RECONQ_REDIS_URL=settings.redis_url or "",
               RECONQ_KEEP_RAW_DAYS="7", RECONQ_KEEP_RESULTS_DAYS="14", RECONQ_KEEP_JOBS_DAYS="14")

    def purge(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "reconq.cli", "purge", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    before = files_under(settings.data_dir / "scans")
    dry = purge("--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("would delete 1 raw scan"), dry.stdout + dry.stderr
    assert files_under(settings.data_dir / "scans") == before
    listed = json.loads(purge("--dry-run", "--json").stdout)
    assert listed["dry_run"] and {i["kind"] for i in listed["items"]} >= {"raw", "results"}
    done = purge()
    assert done.returncode == 0 and "deleted 1 raw scan" in done.stdout, done.stdout + done.stderr
    assert not scans.raw_path(old.scan_id).exists()
    off = dict(env, RECONQ_KEEP_RAW_DAYS="0", RECONQ_KEEP_RESULTS_DAYS="0", RECONQ_KEEP_JOBS_DAYS="0")
    quiet = subprocess.run([sys.executable, "-m", "reconq.cli", "purge"], env=off, capture_output=True, text=True,
                           timeout=120)
    assert quiet.returncode == 0 and "retention is off" in quiet.stdout, quiet.stdout


# --- what a retrieval and the staff actions see after a purge ---------------------------------------------

def test_an_exams_job_records_go_together_or_not_at_all(settings, scans, store, client,
                                                       start_gateway: Callable[..., Gateway]):
    """Scan A, then a repeat B of the same protocol, then a retro-recon of A. B's files are all due, A's
    newest results not yet: B's job record stays (saying its images were deleted), or a retrieval would take
    A's older acquisition for the exam's newest."""
    older = add_scan(scans, client, "S-examA", protocol="t1_rep")
    newer = add_scan(scans, client, "S-examB", protocol="t1_rep")
    add_job(store, scans, older, ended_days_ago=10)
    repeat = add_job(store, scans, newer, ended_days_ago=10)
    retro = add_job(store, scans, older, n=2, ended_days_ago=2)

    run_purge(keep(settings, raw=7, results=7, jobs=7), client, dry_run=False)
    assert not (settings.data_dir / "scans" / "S-examB").exists()  # its files all went
    kept = store.get(repeat.id)
    assert kept is not None and kept.results_purged_at is not None  # its record did not: A's is not due
    assert store.get(retro.id).result_path

    host, port = start_gateway().address
    back = mrd.retrieve(host, port, mrd.retrieval_header(PATIENT, STUDY, "t1_rep"), timeout=30)
    assert back.closed and not back.images, back.texts  # never the older scan's images instead
    assert any(t.startswith("ERR") and f"images of job {repeat.id} were deleted by retention" in t
               for t in back.texts), back.texts


def test_a_retro_recon_made_as_its_scan_is_purged_fails_saying_so(settings, store, client):
    """Retention marks the scan, then reads its jobs; a retro-recon makes its job, then reads the scan: a
    retro that read the scan just before the purge marked it finds the mark and its job fails, not queued."""
    from reconq.core.celeryapp import make_celery
    from reconq.core.constants import Queue
    from reconq.core.sender import TaskSender
    from reconq.recon.registry import pipeline_names
    from reconq.scheduler.actions import ActionRefused, Actions

    class PurgedAfterLoad(ScanStore):
        """The purge runs right after the retro-recon has read the scan (complete then)."""

        def load(self, scan_id: str) -> ScanRecord:
            record = super().load(scan_id)
            if record.raw_purged_at is None and not getattr(self, "purged", False):
                self.purged = True
                run_purge(keep(settings, raw=7), client, dry_run=False)
            return record

    scans = PurgedAfterLoad(settings.data_dir)
    record = add_scan(scans, client, "S-retro-race")
    add_job(store, scans, record, ended_days_ago=10)
    earlier = add_job(store, scans, record, n=2, state=JobState.FAILED, ended_days_ago=10)
    actions = Actions(store, TaskSender(make_celery(settings)), scans, pipeline_names())
    (job,) = actions.retro_recon_many(["S-retro-race"], "cartesian", None, Queue.BULK, who="test")
    assert not scans.raw_path("S-retro-race").exists()  # the purge saw no job not ended, and deleted
    failed = store.get(job.id)
    assert failed.state is JobState.FAILED and "deleted by retention" in failed.error and "cannot run" in failed.error
    assert failed.queued_at is None  # never sent to a worker

    with pytest.raises(ActionRefused, match="deleted by retention on .*cannot be run again"):
        actions.retry(earlier.id, who="test")  # its raw data is gone too
    assert store.get(earlier.id).state is JobState.FAILED


def test_an_exams_records_stay_together_when_an_older_scans_deletion_fails(settings, store, client,
                                                                           start_gateway: Callable[..., Gateway]):
    """All of an exam is due, but the older scan's result file cannot be deleted (an OSError): that scan and
    its record stay, so the newer scan's record stays too, and a retrieval is told the newest images were
    deleted instead of getting the older scan's."""

    class Stuck(ScanStore):
        def delete_file(self, path: Path) -> int:
            if "S-stuck1" in str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return super().delete_file(path)

    scans = Stuck(settings.data_dir)
    older = add_job(store, scans, add_scan(scans, client, "S-stuck1", protocol="t2_stuck"), ended_days_ago=20)
    newer = add_job(store, scans, add_scan(scans, client, "S-stuck2", protocol="t2_stuck"), ended_days_ago=20)
    plan = plan_purge(keep(settings, raw=7, results=7, jobs=7), scans, store, time.time())
    assert {(i.kind, i.id) for i in plan.of(Kind.JOB)} == {(Kind.JOB, older.id), (Kind.JOB, newer.id)}

    report = apply_purge(plan, scans, store)
    assert not (settings.data_dir / "scans" / "S-stuck2").exists()  # the newer scan's files went
    assert store.get(older.id) is not None and store.get(newer.id) is not None  # neither record did
    assert any(k.id == newer.id and f"an older record of its exam ({older.id}) is kept" in k.why
               for k in report.kept), report.kept

    host, port = start_gateway().address
    back = mrd.retrieve(host, port, mrd.retrieval_header(PATIENT, STUDY, "t2_stuck"), timeout=30)
    assert not back.images and any(f"images of job {newer.id} were deleted by retention" in t for t in back.texts)


def test_records_without_a_patient_or_study_go_alone(settings, scans, store, client):
    """Phantom and QA scans with no identity: no retrieval matches them, so one recent such scan does not
    keep every old one's record for ever."""
    old = add_scan(scans, client, "S-qa-old", patient="")
    recent = add_scan(scans, client, "S-qa-new", patient="")
    old_job = add_job(store, scans, old, ended_days_ago=30)
    add_job(store, scans, recent, ended_days_ago=1)
    run_purge(keep(settings, raw=7, results=7, jobs=7), client, dry_run=False)
    assert store.get(old_job.id) is None and scans.raw_path("S-qa-new").exists()


def test_a_purge_and_a_retro_recon_each_wait_for_the_scans_guard(settings, scans, store, client):
    """The guard orders them: while it is held, neither a purge's raw-data step nor a retro-recon's new job
    goes ahead; each does once it is released."""
    import threading

    from reconq.core.celeryapp import make_celery
    from reconq.core.constants import Queue
    from reconq.core.sender import TaskSender
    from reconq.recon.registry import pipeline_names
    from reconq.scheduler.actions import Actions
    from reconq.scheduler.retention import scan_guard

    purged = add_scan(scans, client, "S-guard1")
    add_job(store, scans, purged, ended_days_ago=10)
    with scan_guard(client, "S-guard1"):
        purge = threading.Thread(target=run_purge, args=(keep(settings, raw=7), client), kwargs={"dry_run": False})
        purge.start()
        purge.join(0.5)
        assert purge.is_alive() and scans.raw_path("S-guard1").exists()  # it waits for the guard
    purge.join(30)
    assert not purge.is_alive() and not scans.raw_path("S-guard1").exists()

    kept = add_scan(scans, client, "S-guard2")
    add_job(store, scans, kept, ended_days_ago=1)
    actions = Actions(store, TaskSender(make_celery(settings)), scans, pipeline_names())
    made: list = []
    with scan_guard(client, "S-guard2"):
        retro = threading.Thread(target=lambda: made.extend(actions.retro_recon_many(
            ["S-guard2"], "cartesian", None, Queue.BULK, who="test")))
        retro.start()
        retro.join(0.5)
        assert retro.is_alive() and store.jobs_for_scan("S-guard2") == ["S-guard2-j1"]  # no job made yet
    retro.join(30)
    assert [j.id for j in made] == ["S-guard2-j2"] and store.get("S-guard2-j2").state is JobState.QUEUED
