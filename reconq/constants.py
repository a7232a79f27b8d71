"""The job vocabulary every role shares: job states, queue names, Redis keys, the task name.

Gateway, workers, scheduler and the API import these names from here and nowhere else.
"""

from __future__ import annotations

from enum import StrEnum

#: Prefix of every Redis key ReconQ writes.
KEY_PREFIX = "reconq:"
#: Hash ``reconq:job:<job_id>``: one job record.
JOB_KEY = KEY_PREFIX + "job:"
#: Sorted set of every job id, scored by creation time.
JOBS_INDEX = KEY_PREFIX + "jobs"
#: Sorted set ``reconq:match:<key>`` of job ids for one patient/study/protocol, scored by time.
MATCH_INDEX = KEY_PREFIX + "match:"
#: Set ``reconq:scanjobs:<scan_id>`` of the job ids made on one scan.
SCAN_JOBS = KEY_PREFIX + "scanjobs:"
#: List ``reconq:log:<job_id>`` of the job's log lines.
JOB_LOG = KEY_PREFIX + "log:"
#: Sorted set of retrieval outcomes (member ``<time>:<ok|miss>:<nonce>``, scored by time).
RETRIEVALS = KEY_PREFIX + "retrievals"
#: Pub/sub channel of job changes (JSON: id, state, progress, stage).
EVENTS_CHANNEL = KEY_PREFIX + "events"

#: Celery task that runs one job; its only argument is the job id (never patient data).
RUN_JOB_TASK = "reconq.run_job"


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
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class Queue(StrEnum):
    """Priority queues, served in this order: a worker takes ``stat`` before ``routine`` before ``bulk``."""

    STAT = "stat"
    ROUTINE = "routine"
    BULK = "bulk"


#: The order in which workers consume queues (Celery's Redis transport polls them in this order).
QUEUE_ORDER: tuple[Queue, ...] = (Queue.STAT, Queue.ROUTINE, Queue.BULK)
