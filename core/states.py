"""The job state machine as data: states, the transitions allowed between them, and the sets derived.

``receiving → queued → waiting_inputs → running → done | failed | cancelled``. One writer,
:meth:`reconq.core.jobs.JobStore.set_state`, changes a job's state, and it refuses (and logs) any change
this table does not allow: a late worker cannot set a ``done`` job ``running`` again, nor anything a
cancelled one. The Lua that writes job records, the API's ``GET /api/vocabulary`` and through it the
dashboard take their lists from here.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Where a job is: ``receiving → queued → waiting_inputs → running → done | failed | cancelled``."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    WAITING_INPUTS = "waiting_inputs"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED

    @property
    def cancellable(self) -> bool:
        return self in CANCELLABLE


S = JobState

#: Every change of state a writer may make: current state -> the states it may go to. A state not listed
#: as its own successor cannot be "set again" (a second ``done``, say); ``queued → queued`` is a job moved
#: to another queue or sent back to wait for GPU memory; ``running → running`` a job delivered again after
#: its worker was lost.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.RECEIVING: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    S.QUEUED: frozenset({S.QUEUED, S.WAITING_INPUTS, S.RUNNING, S.FAILED, S.CANCELLED}),
    S.WAITING_INPUTS: frozenset({S.QUEUED, S.WAITING_INPUTS, S.RUNNING, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.QUEUED, S.RUNNING, S.DONE, S.FAILED, S.CANCELLED}),
    S.DONE: frozenset(),
    S.FAILED: frozenset({S.QUEUED}),  # a staff retry
    S.CANCELLED: frozenset(),
}

#: States a job ends in: no worker acts on it any more (only a staff retry takes a failed job back).
FINISHED: frozenset[JobState] = frozenset({S.DONE, S.FAILED, S.CANCELLED})
#: States from which staff may cancel a job.
CANCELLABLE: frozenset[JobState] = frozenset(s for s, nxt in TRANSITIONS.items() if S.CANCELLED in nxt)
#: States in which a job is on its way (to be waited for by a retrieval scan).
ACTIVE: frozenset[JobState] = frozenset(JobState) - FINISHED

#: The timestamp a change to each state sets unless the writer gives it (``queued_at`` is always given:
#: a job moved between queues, or sent back to wait, keeps the age it had).
STAMPS: dict[JobState, str] = {S.RUNNING: "started_at", **{s: "finished_at" for s in FINISHED}}


def allowed_from(target: JobState) -> list[JobState]:
    """The states from which a job may go to ``target``."""
    return [s for s, nxt in TRANSITIONS.items() if target in nxt]


def can_move(current: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[current]


def vocabulary() -> dict[str, object]:
    """The state machine as JSON-ready data, for the dashboard (``GET /api/vocabulary``)."""
    return {
        "states": [s.value for s in JobState],
        "transitions": {s.value: sorted(t.value for t in nxt) for s, nxt in TRANSITIONS.items()},
        "finished": sorted(s.value for s in FINISHED),
        "cancellable": sorted(s.value for s in CANCELLABLE),
        "active": sorted(s.value for s in ACTIVE),
    }
