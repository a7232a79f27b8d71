"""The job state machine: the transition table is what Redis enforces, through the one state writer."""

from __future__ import annotations

import itertools
import logging

import pytest

from reconq.core.constants import JOB_KEY
from reconq.core.jobs import Job, JobStore
from reconq.core.states import ACTIVE, CANCELLABLE, FINISHED, TRANSITIONS, JobState, can_move, vocabulary


def job_in(store: JobStore, job_id: str, state: JobState) -> None:
    """A job record in ``state``, written as it would be found in Redis."""
    store.create(Job(id=job_id, scan_id=f"scan-{job_id}", pipeline="cartesian"))
    store.redis.hset(JOB_KEY + job_id, "state", state.value)


def test_a_late_worker_cannot_set_a_done_job_running(store: JobStore, caplog: pytest.LogCaptureFixture):
    store.create(Job(id="d-j1", scan_id="d", pipeline="cartesian"))
    assert store.set_state("d-j1", JobState.RUNNING, attempts=1, worker="w1")
    assert store.set_state("d-j1", JobState.DONE, progress=1.0, result_path="scans/d/results/d-j1.h5")
    with caplog.at_level(logging.WARNING, logger="reconq.core.jobs"):
        assert store.set_state("d-j1", JobState.RUNNING, attempts=2, worker="w2", stage="starting") is False
    job = store.get("d-j1")
    assert job is not None
    assert (job.state, job.worker, job.attempts, job.stage) == (JobState.DONE, "w1", 1, "")
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals == ["job d-j1: change of state done -> running refused (not an allowed transition); "
                        "it stays done"]


def test_every_transition_is_allowed_exactly_as_the_table_says(store: JobStore):
    for n, (before, after) in enumerate(itertools.product(JobState, JobState)):
        job_id = f"t{n}"
        job_in(store, job_id, before)
        written = store.set_state(job_id, after, stage="moved")
        job = store.get(job_id)
        assert job is not None
        assert written is can_move(before, after), (before, after)
        assert job.state is (after if written else before), (before, after)
        assert job.stage == ("moved" if written else ""), (before, after)


def test_the_state_is_written_by_set_state_only(store: JobStore):
    store.create(Job(id="u-j1", scan_id="u", pipeline="cartesian"))
    with pytest.raises(KeyError, match="set_state"):
        store.update("u-j1", state=JobState.DONE.value)
    assert store.get("u-j1").state is JobState.QUEUED


def test_entering_a_state_stamps_it_once_and_logs_changes_only(store: JobStore):
    store.create(Job(id="s-j1", scan_id="s", pipeline="cartesian"))
    assert store.set_state("s-j1", JobState.QUEUED, stage="waiting for GPU memory")
    assert store.set_state("s-j1", JobState.RUNNING)
    assert store.set_state("s-j1", JobState.FAILED, error="out of memory")
    job = store.get("s-j1")
    assert job.started_at and job.finished_at and job.finished_at >= job.started_at
    states = [line.split(" ", 1)[1] for line in store.log_lines("s-j1") if " state " in f" {line}"]
    assert states == ["state running", "state failed: out of memory"]  # queued -> queued is no change


def test_stage_timings_come_from_structured_records(store: JobStore):
    store.create(Job(id="g-j1", scan_id="g", pipeline="cartesian"))
    store.set_state("g-j1", JobState.RUNNING)
    store.enter_stage("g-j1", "reading", at=100.0)
    store.enter_stage("g-j1", "coil maps", at=102.5)
    store.set_state("g-j1", JobState.DONE, finished_at=110.0)
    timings = store.stage_timings(store.get("g-j1"))
    assert [(t.stage, t.started_at, t.seconds) for t in timings] == [("reading", 100.0, 2.5),
                                                                     ("coil maps", 102.5, 7.5)]
    store.create(Job(id="g-j2", scan_id="g", pipeline="cartesian"))
    store.set_state("g-j2", JobState.RUNNING)
    store.enter_stage("g-j2", "reading", at=200.0)
    running = store.stage_timings(store.get("g-j2"), now=203.0)  # still running: up to now
    assert [(t.stage, t.seconds) for t in running] == [("reading", 3.0)]


def test_derived_sets_and_vocabulary_follow_the_table():
    assert {s for s in JobState if s.finished} == FINISHED
    assert all(JobState.CANCELLED in TRANSITIONS[s] for s in CANCELLABLE)
    assert not (FINISHED & CANCELLABLE) and set(JobState) == ACTIVE | FINISHED
    assert all(not TRANSITIONS[s] - {JobState.QUEUED} for s in FINISHED)  # only a retry leaves an end state
    v = vocabulary()
    assert v["states"] == [s.value for s in JobState]
    assert set(v["finished"]) == {s.value for s in FINISHED}
    assert v["transitions"]["done"] == [] and "running" in v["transitions"]["queued"]


def test_a_run_handed_back_cannot_record_an_outcome(store):
    """Fenced by its run's number: once the job runs again (attempts 2), run 1's writes are refused."""
    store.create(Job(id="f-j1", scan_id="f", pipeline="cartesian"))
    assert store.set_state("f-j1", JobState.RUNNING, attempts=1)
    assert store.update("f-j1", fence=1, progress=0.5)
    assert store.set_state("f-j1", JobState.QUEUED, fence=1, stage="handed back")
    assert store.set_state("f-j1", JobState.RUNNING, attempts=2)
    assert not store.update("f-j1", fence=1, progress=0.9)  # the old run's progress
    assert not store.set_state("f-j1", JobState.DONE, fence=1, result_path="old")
    assert store.set_state("f-j1", JobState.DONE, fence=2, result_path="scans/f/results/f-j1.h5")
    job = store.get("f-j1")
    assert job is not None and job.state is JobState.DONE and job.result_path.startswith("scans/")


def test_a_run_handed_back_writes_nothing_more_even_before_another_starts(store):
    """Once handed back (queued, no new run yet), the old run's progress, warnings and outcome are refused:
    it learns so at its next progress write and stops; a second hand-back of the same run is refused too."""
    store.create(Job(id="h-j1", scan_id="h", pipeline="cartesian"))
    assert store.set_state("h-j1", JobState.RUNNING, fence="=0", attempts=1)
    assert store.set_state("h-j1", JobState.QUEUED, fence=1, stage="handed back")
    assert not store.set_state("h-j1", JobState.QUEUED, fence=1, stage="handed back again")  # two judges: one wins
    assert not store.update("h-j1", fence=1, progress=0.7)
    assert not store.set_state("h-j1", JobState.FAILED, fence=1, error="late")
    job = store.get("h-j1")
    assert job is not None and job.state is JobState.QUEUED and job.stage == "handed back" and not job.error


def test_of_two_deliveries_only_one_starts_the_run(store):
    """Both read attempts 0; the start is fenced by it, so the second start is refused (no two runs 1)."""
    store.create(Job(id="d-j1", scan_id="d", pipeline="cartesian"))
    assert store.set_state("d-j1", JobState.RUNNING, fence="=0", attempts=1, worker="w1")
    assert not store.set_state("d-j1", JobState.RUNNING, fence="=0", attempts=1, worker="w2")
    job = store.get("d-j1")
    assert job is not None and job.worker == "w1" and job.attempts == 1


def test_the_running_set_follows_every_change_of_state(store):
    store.create(Job(id="r-j1", scan_id="r", pipeline="cartesian"))
    assert store.running_ids() == []
    assert store.set_state("r-j1", JobState.RUNNING, attempts=1)
    assert store.running_ids() == ["r-j1"]
    assert store.update("r-j1", fence=1, progress=0.5)
    assert store.running_ids() == ["r-j1"]
    assert store.set_state("r-j1", JobState.DONE, fence=1)
    assert store.running_ids() == []
