"""The vocabulary every role shares: queue names, Redis keys, the task name (job states: :mod:`reconq.core.states`).

Gateway, workers, scheduler and the API import these names from here and nowhere else.
"""

from __future__ import annotations

from enum import StrEnum

#: Job parameters naming another scan the job needs: a scan id, or the protocol of the newest complete
#: scan of the same patient and study (see :mod:`reconq.workers.inputs`).
REFERENCE_SCAN, REFERENCE_PROTOCOL = "reference_scan", "reference_protocol"
INPUT_PARAMS = (REFERENCE_SCAN, REFERENCE_PROTOCOL)

#: Prefix of every Redis key ReconQ writes.
KEY_PREFIX = "reconq:"
#: Hash ``reconq:job:<job_id>``: one job record.
JOB_KEY = KEY_PREFIX + "job:"
#: Sorted set of every job id, scored by creation time.
JOBS_INDEX = KEY_PREFIX + "jobs"
#: Set: the ids of the jobs running now (kept by core/lua/job_update.lua with every change of state).
RUNNING_JOBS = KEY_PREFIX + "running"
#: Sorted set ``reconq:exam:<digest>`` of the job ids of one patient, study and protocol, scored by the
#: job's number (:data:`JOB_SEQ`), so "newest" does not depend on the wall clock.
EXAM_INDEX = KEY_PREFIX + "exam:"
#: Counter numbering every job as it is recorded.
JOB_SEQ = KEY_PREFIX + "jobseq"
#: Set ``reconq:scanjobs:<scan_id>`` of the job ids made on one scan.
SCAN_JOBS = KEY_PREFIX + "scanjobs:"
#: List ``reconq:log:<job_id>`` of the job's log lines.
JOB_LOG = KEY_PREFIX + "log:"
#: List ``reconq:stages:<job_id>`` of the job's stage marks (JSON: stage, at; stage '' when it ended).
JOB_STAGES = KEY_PREFIX + "stages:"
#: Sorted set of retrieval outcomes (member ``<time>:<ok|miss>:<nonce>``, scored by time).
RETRIEVALS = KEY_PREFIX + "retrievals"
#: Pub/sub channel of job changes (JSON: id, state, progress, stage).
EVENTS_CHANNEL = KEY_PREFIX + "events"
#: String: the id of the data root every process must see, as in its ``reconq-root.json``
#: (:mod:`reconq.core.dataroot`).
DATA_ROOT_KEY = KEY_PREFIX + "dataroot"
#: Sorted set ``reconq:scanidx:<digest>`` of the complete scans of one patient, study and protocol (the digest
#: is a sha256: no identifier in clear), scored by completion time (:mod:`reconq.scheduler.scanindex`).
SCAN_INDEX = KEY_PREFIX + "scanidx:"
#: Hash: scan id -> JSON ``{"digest", "completed_at"}`` of every scan in :data:`SCAN_INDEX`.
SCANS_INDEXED = KEY_PREFIX + "scansindexed"
#: String: the token of the one retention purge running over the data root (:mod:`reconq.scheduler.retention`).
PURGE_LOCK = KEY_PREFIX + "purgelock"
#: String ``reconq:scanguard:<scan_id>``: a purge of that scan, or a staff action making or queueing a job on
#: it, holds its token while it runs (:func:`reconq.scheduler.retention.scan_guard`).
SCAN_GUARD = KEY_PREFIX + "scanguard:"

#: Celery task that runs one job; its only argument is the job id (never patient data).
RUN_JOB_TASK = "reconq.run_job"


class Queue(StrEnum):
    """Priority queues, served in this order: a worker takes ``stat`` before ``routine`` before ``bulk``."""

    STAT = "stat"
    ROUTINE = "routine"
    BULK = "bulk"


#: The order in which workers consume queues (Celery's Redis transport polls them in this order).
QUEUE_ORDER: tuple[Queue, ...] = (Queue.STAT, Queue.ROUTINE, Queue.BULK)

# --- GPU scheduling (scheduler/, workers/) ---------------------------------------------------------
#: Queue of jobs that fit no GPU and may run on the CPU; only CPU workers consume it.
CPU_QUEUE = "cpu"
#: Prefix of the per-GPU queue ``gpu.<gpu_id>``: jobs already granted memory on that GPU.
GPU_QUEUE_PREFIX = "gpu."
#: Hash ``reconq:resv:<gpu_id>``: job id -> bytes reserved on that GPU by an admitted job.
GPU_RESERVATIONS = KEY_PREFIX + "resv:"
#: Hash ``reconq:resvowner:<gpu_id>``: job id -> the worker holding that reservation.
GPU_RESERVATION_OWNERS = KEY_PREFIX + "resvowner:"
#: Hash ``reconq:resvend:<gpu_id>``: job id -> when its reservation is expected to end (epoch seconds;
#: for reservations whose run time is estimated), for backfilling.
GPU_RESERVATION_ENDS = KEY_PREFIX + "resvend:"
#: Hash: gpu id -> bytes that reservations on it may share (its memory less other programs' use).
GPU_CAPACITY = KEY_PREFIX + "gpucap"
#: Hash: gpu id -> the GPU's total memory in bytes.
GPU_TOTAL = KEY_PREFIX + "gputotal"
#: Hash: gpu id -> when a worker of that GPU last reported it (epoch seconds).
GPU_SEEN = KEY_PREFIX + "gpuseen"
#: Hash: gpu id -> JSON state of the GPU (name, memory, utilisation, temperature, processes).
GPU_STATE = KEY_PREFIX + "gpus"
#: String ``reconq:hb:<worker>`` with a TTL: a worker's heartbeat (JSON: its GPU and running job).
WORKER_HEARTBEAT = KEY_PREFIX + "hb:"
#: String per worker process: set while its Celery main process stops (no more dispatch to its GPU).
WORKER_DRAINING = KEY_PREFIX + "draining:"
#: Set of worker names that have sent heartbeats (readers skip expired ones; heartbeats prune them).
WORKERS_INDEX = KEY_PREFIX + "workers"
#: Sorted set of jobs waiting for GPU memory, scored by queue rank then time queued.
GPU_WAITING = KEY_PREFIX + "waiting"
#: Hash: job id -> bytes needed, for the jobs in :data:`GPU_WAITING`.
GPU_WAITING_NEED = KEY_PREFIX + "waitneed"
#: Hash: job id -> expected run time in seconds, for the jobs in :data:`GPU_WAITING` whose run time is
#: estimated (see :mod:`reconq.scheduler.estimate`).
GPU_WAITING_SECONDS = KEY_PREFIX + "waitsecs"
#: List per device class, pipeline and protocol (``<prefix><gpu|cpu>:<pipeline>:<protocol>``): the run times of
#: its latest jobs.
RUNTIME_HISTORY = KEY_PREFIX + "runtimes:"

# --- Dashboard, staff actions and metrics (gateway/) ----------------------------------------------
#: List ``reconq:actions:<job_id>`` of staff actions on the job (JSON: at, who, action, detail).
JOB_ACTIONS = KEY_PREFIX + "actions:"
#: Counter ``reconq:jobseq:<scan_id>``: the number of the scan's newest job (``<scan_id>-j<n>``).
SCAN_JOB_SEQ = KEY_PREFIX + "jobseq:"
#: String ``reconq:session:<sha256 of the session token>`` holding the staff name; expires.
SESSION_KEY = KEY_PREFIX + "session:"
#: Counter ``reconq:signin_fail:<name>`` of failed sign-ins in the current minute.
SIGNIN_FAILURES = KEY_PREFIX + "signin_fail:"
#: Hash of gateway counters (``bytes_received``, ``sessions_total``, ...) kept by the gateway, if any.
GATEWAY_STATS = KEY_PREFIX + "stats:gateway"
