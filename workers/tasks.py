"""The recon task: run the pipeline a job names on its stored scan, store the images, report progress."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import ismrmrd
from celery import Celery

from recon.errors import ReconError
from recon.pipelines import get_pipeline
from recon.rawdata import RawScan
from reconq.constants import RUN_JOB_TASK, JobState
from reconq.jobs import Job, JobStore
from reconq.redisconn import connect
from reconq.settings import Settings
from reconq.storage import ScanStore
from workers.results import write_images

log = logging.getLogger(__name__)


class ProgressReporter:
    """Writes a job's progress to Redis, at most every ``interval`` seconds unless the stage changes."""

    def __init__(self, store: JobStore, job_id: str, interval: float = 0.5) -> None:
        self.store, self.job_id, self.interval = store, job_id, interval
        self._last, self._stage = 0.0, ""

    def __call__(self, fraction: float, stage: str) -> None:
        now = time.monotonic()
        if stage == self._stage and now - self._last < self.interval:
            return
        if stage != self._stage:
            self.store.log(self.job_id, f"stage {stage}")
        self._last, self._stage = now, stage
        self.store.update(self.job_id, progress=round(min(max(fraction, 0.0), 1.0), 4), stage=stage)


class JobRunner:
    """Runs jobs by id; one per worker process."""

    def __init__(self, settings: Settings, store: JobStore, worker_name: str, gpu: str = "cpu") -> None:
        self.settings = settings
        self.store = store
        self.scans = ScanStore(settings.data_dir)
        self.worker_name = worker_name
        self.gpu = gpu

    def run(self, job_id: str) -> str:
        """Run one job; returns its final state. Redelivered jobs already finished are left alone."""
        job = self.store.get(job_id)
        if job is None:
            log.error("job %s: no such job record; message dropped", job_id)
            return "missing"
        if job.state.finished:
            log.info("job %s: already %s; nothing to do", job_id, job.state)
            return job.state.value
        self.store.set_state(job_id, JobState.RUNNING, attempts=job.attempts + 1, worker=self.worker_name,
                             gpu=self.gpu, progress=0.0, stage="starting", error="")
        log.info("job %s: running pipeline %s on scan %s", job_id, job.pipeline, job.scan_id)
        t0 = time.perf_counter()
        try:
            result = self._reconstruct(job)
        except ReconError as e:
            return self._fail(job_id, str(e))
        except Exception as e:  # a bug or a resource error: record it, keep the worker alive
            log.exception("job %s: internal error", job_id)
            return self._fail(job_id, f"internal error: {type(e).__name__}: {e}")
        self.store.set_state(job_id, JobState.DONE, progress=1.0, stage="done", result_path=str(result))
        log.info("job %s: done in %.1f s -> %s", job_id, time.perf_counter() - t0, result)
        return JobState.DONE.value

    def _reconstruct(self, job: Job) -> Path:
        pipeline = get_pipeline(job.pipeline)
        progress = ProgressReporter(self.store, job.id)
        with RawScan.open(self.scans.raw_path(job.scan_id)) as scan:
            images: list[ismrmrd.Image] = pipeline.run(scan, job.params, progress)
            xml = scan.xml
        if not images:
            raise ReconError(f"pipeline {job.pipeline} produced no images")
        progress(0.99, "storing")
        path = self.scans.result_path(job.scan_id, job.id)
        write_images(path, images, xml)
        self.store.log(job.id, f"{len(images)} images stored")
        return path

    def _fail(self, job_id: str, error: str) -> str:
        self.store.set_state(job_id, JobState.FAILED, error=error, stage="failed")
        log.warning("job %s: failed: %s", job_id, error)
        return JobState.FAILED.value


def register_tasks(app: Celery, settings: Settings) -> None:
    """Register :data:`RUN_JOB_TASK` on ``app`` (and the recon plugins); the runner connects on first use."""
    from workers.plugins import load_plugins

    load_plugins(settings.plugin_dir, settings.parameter_map)
    runner: dict[str, JobRunner] = {}

    def get_runner() -> JobRunner:
        if "r" not in runner:
            name = f"{socket.gethostname()}:{os.getpid()}"
            runner["r"] = JobRunner(settings, JobStore(connect(settings)), name)
        return runner["r"]

    @app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run_job(job_id: str) -> str:
        return get_runner().run(job_id)
