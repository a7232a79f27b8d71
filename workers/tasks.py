"""The recon task: admit the job to this worker's GPU, run its pipeline on the stored scan, store the
images, report progress, and release the GPU memory however the job ends."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ismrmrd
import redis
from celery import Celery
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown, worker_shutting_down

from reconq.core.constants import CPU_QUEUE, JOB_KEY, RUN_JOB_TASK
from reconq.core.jobs import Job, JobStore
from reconq.core.logs import JobContext, job_context
from reconq.core.mrdfile import MrdFileError
from reconq.core.redisconn import connect
from reconq.core.results import result_file, write_images
from reconq.core.sender import TaskSender
from reconq.core.settings import Settings
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.recon.errors import ReconError
from reconq.recon.pipeline import Pipeline
from reconq.recon.rawdata import RawScan
from reconq.recon.registry import get_pipeline
from reconq.scheduler.admission import Admission, Decision, Verdict
from reconq.scheduler.estimate import CPU, GB, GPU, EstimateError, record_runtime
from reconq.scheduler.inventory import make_inventory
from reconq.scheduler.placement import estimate_job
from reconq.scheduler.routing import gpu_queue, waiting_score
from reconq.workers.heartbeat import Heartbeat
from reconq.workers.inputs import InputsMissing, InputsNotReady, resolve_inputs
from reconq.workers.shutdown import GracefulStop
from reconq.workers.slot import Slot, cpu_slot, gpu_slot, worker_name

log = logging.getLogger(__name__)

SendFn = Callable[..., None]  # (job id, queue, countdown seconds=0)

#: After a progress write fails, how long a recon writes no progress (each try would wait for its timeout).
REDIS_QUIET_S = 5.0


class JobCancelled(Exception):
    """The job was cancelled while it ran."""


class ReconFailed(Exception):
    """Raised by the task once its job is recorded ``failed``, so that Celery records the task as FAILURE
    (Flower, celery-exporter). Expected (the task's ``throws``): logged without a traceback, never retried;
    with ``task_acks_on_failure_or_timeout`` (True) the message is acked, not redelivered."""

    def __init__(self, job_id: str, error: str = "") -> None:
        super().__init__(job_id, error)
        self.job_id, self.error = job_id, error

    def __str__(self) -> str:
        return f"job {self.job_id} failed: {self.error}" if self.error else f"job {self.job_id} failed"


class JobSuperseded(Exception):
    """The job was handed back (this worker's heartbeat lapsed) and a newer run holds it: stop this one."""


def is_gpu_oom(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a GPU out-of-memory error (cupy, torch, simulated)."""
    seen: BaseException | None = exc
    while seen is not None:
        names = {cls.__name__ for cls in type(seen).__mro__}
        if names & {"OutOfMemoryError", "SimulatedGpuOutOfMemory"} or "CUDA out of memory" in str(seen) \
                or "CUDA_ERROR_OUT_OF_MEMORY" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def gb(nbytes: int) -> str:
    return f"{nbytes / GB:.1f} GB"


class ProgressReporter:
    """Writes a job's progress to Redis, at most every ``interval`` seconds unless the stage changes; when
    it writes, it also checks whether the job was cancelled, and stops the recon if so."""

    def __init__(self, store: JobStore, job_id: str, interval: float = 0.5, fence: int | None = None) -> None:
        self.store, self.job_id, self.interval, self.fence = store, job_id, interval, fence
        self._last, self._stage = 0.0, ""
        self._redis_down = False
        self._quiet_until = 0.0
        self._unwritten = False
        self.warnings: list[str] = []
        self.results: dict[str, Any] = {}

    def __call__(self, fraction: float, stage: str) -> None:
        now = time.monotonic()
        if stage == self._stage and now - self._last < self.interval:
            return
        if now < self._quiet_until:  # Redis failed lately: no write (each would wait its timeout) until then
            return
        try:
            if self.store.redis.hget(JOB_KEY + self.job_id, "state") == JobState.CANCELLED.value:
                raise JobCancelled(self.job_id)
            written = self.store.update(self.job_id, fence=self.fence,
                                        progress=round(min(max(fraction, 0.0), 1.0), 4), stage=stage)
            if written and stage != self._stage:  # only this run's stages (the update is fenced)
                self.store.enter_stage(self.job_id, stage)
        except redis.RedisError as e:  # a Redis blip: the recon goes on, its progress is shown again later
            if not self._redis_down:
                log.warning("job %s: progress not recorded (Redis unavailable: %s); the recon goes on",
                            self.job_id, e)
            self._redis_down, self._last, self._stage = True, now, stage
            self._quiet_until = now + REDIS_QUIET_S
            return
        self._redis_down, self._last, self._stage = False, now, stage
        if not written:
            raise JobSuperseded(self.job_id)

    def warn(self, text: str) -> None:
        """A warning of the recon (:func:`reconq.recon.pipeline.warn`): on the job and in its log."""
        self.warnings.append(str(text))

        def write() -> None:
            if self.store.update(self.job_id, fence=self.fence, warnings=self.warnings):
                self.store.log(self.job_id, f"WRN {text}")

        self._write(write)

    def report(self, name: str, value: Any) -> None:
        """A result beside the images (:func:`reconq.recon.pipeline.report`), kept on the job."""
        self.results[str(name)] = json.loads(json.dumps(value))  # JSON now, not at the end
        self._write(lambda: self.store.update(self.job_id, fence=self.fence, report=self.results))

    def _write(self, write: Callable[[], object]) -> None:
        """A warning or report written now; in a Redis outage it is kept and written with the outcome."""
        try:
            write()
        except redis.RedisError as e:
            log.warning("job %s: warning/report not recorded yet (Redis unavailable: %s); kept for the outcome",
                        self.job_id, e)
            self._unwritten = True

    def clear(self) -> None:
        """No warnings and no report yet (an earlier run's are on the job until now)."""
        self._write(lambda: self.store.update(self.job_id, fence=self.fence, warnings=[], report={}))

    def unwritten(self) -> dict[str, Any]:
        """The warnings and report to write with the job's outcome, where a Redis outage kept them back."""
        return {"warnings": self.warnings, "report": self.results} if self._unwritten else {}


class JobRunner:
    """Runs jobs by id; one per worker process, bound to one GPU or to the CPU (:class:`Slot`)."""

    def __init__(self, settings: Settings, store: JobStore, name: str, slot: Slot,
                 admission: Admission | None = None, send: SendFn | None = None,
                 heartbeat: Heartbeat | None = None) -> None:
        self.settings, self.store, self.worker_name, self.slot = settings, store, name, slot
        self.scans = ScanStore(settings.data_dir)
        self.admission, self.heartbeat = admission, heartbeat
        self.send: SendFn = send or (lambda job_id, queue: None)

    @property
    def gpu(self) -> str:
        return self.slot.label

    def run(self, job_id: str) -> str:
        """Run one job if it may start here; returns its state. Finished jobs are left alone. Every line
        logged meanwhile in this thread carries the job id, scan id and worker (:mod:`reconq.core.logs`)."""
        with job_context(job_id, worker=self.worker_name) as ctx:
            return self._run(job_id, ctx)

    def _run(self, job_id: str, ctx: JobContext) -> str:
        job = self.store.get(job_id)
        if job is not None:
            ctx.scan_id = job.scan_id
        if job is None:
            log.error("job %s: no such job record; message dropped", job_id)
            return "missing"
        if job.state.finished:
            if self.slot.is_gpu and self.admission is not None:
                self.admission.release(self.slot.gpu_id, job_id)  # reserved for it before it was cancelled
            log.info("job %s: already %s; nothing to do", job_id, job.state)
            return job.state.value
        if job.state is JobState.RUNNING and job.worker != self.worker_name:
            # Running elsewhere: that run's worker may be alive (a second delivery), dead (its message came
            # back with reject_on_worker_lost), or not yet beating again after a Redis outage. Which, the
            # heartbeats decide (Heartbeat.hand_back: settled, fenced, counted), never a delivery.
            log.info("job %s: running on %s; this delivery dropped (its heartbeats decide whether it is lost)",
                     job_id, job.worker)
            return "duplicate"
        if job.state is JobState.RUNNING:  # here, but this process runs no job: its run ended without an outcome
            self.store.log(job_id, f"the run on {job.worker} ended without an outcome; run again")
        try:
            job.params = resolve_inputs(job, self.scans, self.store.redis)
        except InputsMissing as e:
            return self._fail(job_id, str(e))
        except InputsNotReady as e:
            return self._wait_for_inputs(job, str(e))
        try:
            pipeline = get_pipeline(job.pipeline)
            need = self._estimate(job, pipeline)
        except (ReconError, EstimateError, MrdFileError, OSError) as e:
            return self._fail(job_id, f"no memory estimate: {e}")
        if not self.slot.is_gpu:
            if not pipeline.cpu_capable:
                return self._fail(job_id, f"pipeline {job.pipeline} needs a GPU and this worker has none")
            return self._execute(job, pipeline, need)
        if not self.settings.admission_control or self.admission is None:
            return self._execute(job, pipeline, need)
        score = waiting_score(job.queue, job.queued_at or job.created_at)
        decision = self.admission.admit(self.slot.gpu_id, job_id, need, self.worker_name, score,
                                        job.runtime_estimate_s)
        self._send_dispatched(decision)
        if decision.verdict is not Verdict.RUN:
            return self._not_now(job, pipeline, need, decision)
        admission = self.admission
        try:
            return self._execute(job, pipeline, need)
        finally:
            self._recorded(job_id, lambda: admission.release(self.slot.gpu_id, job_id, self.worker_name) or True)
            self._dispatch_next()

    def _wait_for_inputs(self, job: Job, what: str) -> str:
        """Keep the job ``waiting_inputs`` and look again in ``inputs_poll_s``, up to ``inputs_wait_s``."""
        waited = time.time() - (job.queued_at or job.created_at)
        if waited > self.settings.inputs_wait_s:
            return self._fail(job.id, f"gave up after {waited:.0f} s waiting for {what}")
        if job.state is not JobState.WAITING_INPUTS:
            self.store.set_state(job.id, JobState.WAITING_INPUTS, stage=f"waiting for {what}")
            log.info("job %s: waiting for %s", job.id, what)
        self.send(job.id, job.queue, countdown=self.settings.inputs_poll_s)
        return JobState.WAITING_INPUTS.value

    def _estimate(self, job: Job, pipeline: Pipeline) -> int:
        return estimate_job(job, self.scans, pipeline, self.store).bytes

    def _not_now(self, job: Job, pipeline: Pipeline, need: int, d: Decision) -> str:
        """The job may not start on this GPU now: it waits, goes to the CPU queue, or fails (NEVER)."""
        here = self.slot.gpu_id
        if d.verdict is Verdict.MOVED:
            self.store.set_state(job.id, JobState.QUEUED, stage=f"{gb(need)} of GPU memory reserved on "
                                                                          f"{d.other_job}; sent there")
            log.info("job %s: does not fit %s now; %s of GPU memory reserved on %s", job.id, here, gb(need),
                     d.other_job)
            return JobState.QUEUED.value
        if d.verdict is Verdict.SWAP:
            log.info("job %s: waiting job %s goes first on %s", job.id, d.other_job, here)
            why = f"waiting job {d.other_job} goes first"
        elif d.verdict is Verdict.HELD:
            why = f"{here} is held for job {d.other_job}, queued earlier"
        elif d.verdict is Verdict.WAIT:
            why = f"{here} has {gb(d.bytes)} free"
        elif d.verdict is Verdict.BIGGER:
            why = f"more than {here} has; a larger GPU ({gb(d.bytes)}) will take it"
        else:
            return self._fits_no_gpu(job, pipeline, need, d.bytes)
        self.store.set_state(job.id, JobState.QUEUED, stage=f"waiting for {gb(need)} of GPU memory: {why}")
        log.info("job %s: waits for %s of GPU memory (%s)", job.id, gb(need), why)
        return JobState.QUEUED.value

    def _fits_no_gpu(self, job: Job, pipeline: Pipeline, need: int, largest: int) -> str:
        what = f"needs {gb(need)} of GPU memory, more than any GPU has (largest: {gb(largest)})"
        if not pipeline.cpu_capable:
            return self._fail(job.id, f"{what}, and pipeline {job.pipeline} cannot run on the CPU")
        self.store.set_state(job.id, JobState.QUEUED, stage=f"{what}: queued for a CPU worker")
        self.send(job.id, CPU_QUEUE)
        log.info("job %s: %s; sent to the CPU queue", job.id, what)
        return JobState.QUEUED.value

    def _send_dispatched(self, d: Decision) -> None:
        """Send the other jobs an admission reserved (on this GPU or another) to their GPUs' queues."""
        for other, gpu_id in d.dispatched:  # this job itself too, when MOVED
            log.info("job %s: memory reserved on %s; sent to its queue", other, gpu_id)
            self.send(other, gpu_queue(gpu_id))
        if d.dispatched and self.heartbeat is not None:
            self.heartbeat.expect_job()

    def _dispatch_next(self) -> None:
        """This worker is about to be idle: fill its GPU with the waiting jobs that fit it now (not when it
        is stopping: no one would consume its GPU's queue)."""
        assert self.admission is not None
        if self.heartbeat is not None and self.heartbeat.draining():
            return
        jobs = self.admission.fill(self.slot.gpu_id, self.worker_name)
        if jobs and self.heartbeat is not None:
            self.heartbeat.expect_job()
        for nxt in jobs:
            self.send(nxt, gpu_queue(self.slot.gpu_id))

    def _execute(self, job: Job, pipeline: Pipeline, need: int) -> str:
        # fenced by the run number read in run(): of two deliveries of one job, only the first starts it
        if not self.store.set_state(job.id, JobState.RUNNING, fence=f"={job.attempts}", attempts=job.attempts + 1,
                                    worker=self.worker_name, gpu=self.gpu, progress=0.0, stage="starting", error=""):
            state = self.store.redis.hget(JOB_KEY + job.id, "state")
            if state == JobState.CANCELLED.value:
                log.info("job %s: cancelled before it started; not run", job.id)
                return JobState.CANCELLED.value
            log.info("job %s: started by another delivery meanwhile (%s); this one dropped", job.id, state)
            return "duplicate"
        job.attempts += 1  # this run's number: its writes are fenced by it
        log.info("job %s: running pipeline %s on scan %s (%s, %s)", job.id, job.pipeline, job.scan_id, self.gpu,
                 gb(need))
        if self.heartbeat is not None:
            self.heartbeat.job_started(job.id)
        try:
            return self._run_started(job, pipeline, need)
        finally:  # after the outcome is recorded: until then this worker's heartbeats name the job as its own
            if self.heartbeat is not None:
                self.heartbeat.job_ended()

    def _run_started(self, job: Job, pipeline: Pipeline, need: int) -> str:
        """The recon of a job just set ``running`` here, and its outcome recorded."""
        t0 = time.perf_counter()
        try:
            result, progress = self._reconstruct(job, pipeline)
        except JobCancelled:
            log.info("job %s: cancelled while running; stopped", job.id)
            return JobState.CANCELLED.value
        except JobSuperseded:
            log.warning("job %s: handed back while it ran here (run %d); a newer run holds it: stopped", job.id,
                        job.attempts)
            return "superseded"
        except SoftTimeLimitExceeded:
            return self._fail(job.id, f"stopped after {time.perf_counter() - t0:.0f} s: the time limit of a "
                                      f"recon is {self.settings.job_time_limit_s} s (RECONQ_JOB_TIME_LIMIT_S)",
                              fence=job.attempts)
        except redis.RedisError:  # Redis past RECONQ_REDIS_RETRY_S inside the recon: not a recon error
            raise  # the message goes back (run_job); the heartbeats hand the job back if no one runs it
        except Exception as e:  # a recon error, a GPU OOM, a bug: record it, keep the worker alive
            if is_gpu_oom(e) and self.slot.is_gpu:
                return self._out_of_memory(job, need, e)
            if isinstance(e, ReconError):
                return self._fail(job.id, str(e), fence=job.attempts)
            log.exception("job %s: internal error", job.id)
            return self._fail(job.id, f"internal error: {type(e).__name__}: {e}", fence=job.attempts)
        elapsed = time.perf_counter() - t0  # (a job cancelled meanwhile refuses the fenced DONE below)
        if not self._recorded(job.id, lambda: self.store.set_state(
                job.id, JobState.DONE, fence=job.attempts, progress=1.0, stage="done",
                result_path=self.scans.stored(result), **progress.unwritten())):
            log.warning("job %s: run %d finished, but a newer run holds the job: its outcome is that run's", job.id,
                        job.attempts)
            result.unlink(missing_ok=True)  # never named in Redis: nothing reads it
            return "superseded"
        # kept per device class: GPU runs estimate GPU jobs, CPU runs (slower) the jobs CPU workers take
        with contextlib.suppress(redis.RedisError):  # a history point; the outcome is what had to be recorded
            record_runtime(self.store.redis, job.pipeline, job.protocol, elapsed, GPU if self.slot.is_gpu else CPU)
        log.info("job %s: done in %.1f s -> %s", job.id, elapsed, result)
        return JobState.DONE.value

    def _out_of_memory(self, job: Job, need: int, error: BaseException) -> str:
        """A GPU OOM: count it, raise the estimate, and send the job back to wait (or fail past the limit)."""
        count = job.oom_count + 1
        if count > self.settings.max_gpu_oom:
            self.store.update(job.id, oom_count=count)
            return self._fail(job.id, f"GPU out of memory {count} times (last estimate {gb(need)}): {error}")
        new_need = int(need * self.settings.oom_estimate_factor)
        self.store.set_state(job.id, JobState.QUEUED, oom_count=count, mem_estimate_bytes=new_need,
                          progress=0.0, stage=f"GPU out of memory on {self.gpu} ({count}x); waits again for "
                                              f"{gb(new_need)}")
        self.store.log(job.id, f"GPU out of memory on {self.gpu}: {error}; estimate {gb(need)} -> {gb(new_need)}")
        log.warning("job %s: GPU out of memory on %s (%d time(s)); queued again with %s", job.id, self.gpu,
                    count, gb(new_need))
        self.send(job.id, job.queue)
        return JobState.QUEUED.value

    def _reconstruct(self, job: Job, pipeline: Pipeline) -> tuple[Path, ProgressReporter]:
        progress = ProgressReporter(self.store, job.id, fence=job.attempts)
        progress.clear()  # an earlier run's warnings and report are not this run's
        params = dict(job.params)
        params["sequence_dir"] = str(self.settings.sequence_folder)  # a folder: only ever set here
        if self.slot.is_gpu and not self.slot.simulated:
            params.setdefault("device", 0)  # the one GPU this process sees (CUDA_VISIBLE_DEVICES)
        with RawScan.open(self.scans.raw_path(job.scan_id)) as scan:
            images: list[ismrmrd.Image] = pipeline.run(scan, params, progress)
            xml = scan.xml
        if not images:
            raise ReconError(f"pipeline {job.pipeline} produced no images")
        progress(0.99, "storing")
        # one file per run: a superseded run that still finishes cannot overwrite the images of the newer one
        path = result_file(self.scans, job)  # job.attempts is this run's number
        write_images(path, images, xml)
        with contextlib.suppress(redis.RedisError):  # the outcome, written next, is tried again; a log line not
            self.store.log(job.id, f"{len(images)} images stored")
        return path, progress

    def _recorded(self, job_id: str, write: Callable[[], bool]) -> bool:
        """``write()`` of a job's outcome, tried again through a Redis outage for up to
        ``RECONQ_REDIS_RETRY_S`` (backoff 0.5 s doubling to 5 s); a RedisError past that goes up, so the
        task's message is not acked but redelivered (:func:`register_tasks`)."""
        deadline, pause = time.monotonic() + self.settings.redis_retry_s, 0.5
        while True:
            try:
                return write()
            except redis.RedisError as e:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("job %s: outcome not recorded yet (Redis unavailable: %s); again in %.1f s", job_id, e,
                            pause)
                time.sleep(pause)
                pause = min(2 * pause, 5.0)

    def _fail(self, job_id: str, error: str, fence: int | None = None) -> str:
        if not self._recorded(job_id, lambda: self.store.set_state(job_id, JobState.FAILED, fence=fence,
                                                                   error=error, stage="failed")):
            log.warning("job %s: not failed (%s): its state or a newer run says otherwise", job_id, error)
            return "superseded" if fence is not None else JobState.FAILED.value
        log.warning("job %s: failed: %s", job_id, error)
        return JobState.FAILED.value


def register_tasks(app: Celery, settings: Settings, gpu_index: int | None = None) -> None:
    """Register :data:`RUN_JOB_TASK` on ``app`` for a worker bound to GPU ``gpu_index`` (None: the CPU).

    Each worker process (Celery's pool child) builds its runner and starts its heartbeat when it starts,
    and stops the heartbeat when it stops. The recon plugins are registered here, in the parent, which
    also hands back recons still running a grace period after a SIGTERM (:mod:`reconq.workers.shutdown`).
    """
    from reconq.recon import runs  # noqa: F401 - the numerical stack, loaded before the pool forks
    from reconq.recon.plugins import load_plugins

    load_plugins(settings.plugin_dir, settings.parameter_map)
    runner: dict[str, JobRunner] = {}
    sender = TaskSender(app)

    def send(job_id: str, queue: str, countdown: float = 0.0) -> None:
        sender.send_current(runner["r"].store.redis, job_id, queue, countdown)

    def start(**_: object) -> None:
        if "r" in runner:
            return
        client = connect(settings)
        inventory = make_inventory(settings)
        slot = cpu_slot(inventory) if gpu_index is None else gpu_slot(settings, inventory, gpu_index)
        name = worker_name(settings)
        admission = Admission(client, settings.backfill_limit_s, settings.gpu_forget_s)
        if settings.enable_test_pipelines:
            from reconq.workers.testpipelines import register_test_pipelines

            register_test_pipelines(client, slot.gpu_id)
        heartbeat = Heartbeat(settings, client, admission, slot, inventory, name, send)
        runner["r"] = JobRunner(settings, JobStore(client), name, slot, admission, send, heartbeat)
        heartbeat.start()
        log.info("worker %s bound to %s, queues %s", name, slot.label, ",".join(slot.queues))

    def stop(**_: object) -> None:
        if "r" in runner and runner["r"].heartbeat is not None:
            runner["r"].heartbeat.stop()

    worker_process_init.connect(start, weak=False)
    worker_process_shutdown.connect(stop, weak=False)
    graceful = GracefulStop(settings, lambda job_id, queue: sender.send_current(graceful.redis, job_id, queue))

    def shutting_down(how: str = "", **_: object) -> None:
        if how == "Warm":  # SIGTERM (or a first Ctrl-C): running recons get the grace period
            graceful.begin()

    worker_shutting_down.connect(shutting_down, weak=False)

    @app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
              throws=(ReconFailed,))
    def run_job(job_id: str) -> str:
        start()
        try:
            state = runner["r"].run(job_id)
        except redis.RedisError as e:  # the outcome could not be recorded: not acked, so it comes again
            log.error("job %s: Redis unavailable past RECONQ_REDIS_RETRY_S (%s): the message goes back", job_id, e)
            raise Reject(f"Redis unavailable: {e}", requeue=True) from e
        if state == JobState.FAILED.value:  # recorded failed: the task ends FAILURE, acked, not retried
            job = runner["r"].store.get(job_id)
            raise ReconFailed(job_id, job.error if job is not None else "")
        return state
