"""Placement at submit: a job goes straight into the waiting set, where every GPU's fill sees it.

Workers take jobs from the priority queues one at a time, and only when idle. A burst of queued jobs
(a retro-recon batch, a busy afternoon) would therefore reach the scheduler in arrival order, a few at
a time, and the first jobs to arrive would take the large GPUs whatever their size. Placed at submit,
every queued job is in the waiting set at once, so each fill chooses among all of them (the order in
:mod:`reconq.scheduler.admission`: ``stat`` jobs, then large jobs on the GPUs that can take them, then the
largest share of memory x expected run time).

:meth:`Placement.place_many` estimates each job's memory and run time where the submitting process can
(the pipeline is registered there and the job names no other scan, whose arrival a worker waits for),
stores both on the job, and calls :meth:`Admission.submit`. The jobs then wait in the waiting set, every
GPU with live workers is filled at once, and the jobs reserved go to their GPUs' queues. Otherwise (no
admission control, a pipeline or an estimate the submitter cannot make, no GPU with live workers, a job
larger than every GPU) the job goes to its priority queue, and the first worker to take it estimates
it and admits it, or sends it on to a CPU worker, or fails it saying why.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconq.core.constants import INPUT_PARAMS
from reconq.core.jobs import Job, JobStore
from reconq.core.mrdfile import MrdFileError, read_header
from reconq.core.sender import TaskSender
from reconq.core.settings import Settings
from reconq.core.storage import ScanStore
from reconq.recon.errors import ReconError
from reconq.recon.pipeline import Pipeline
from reconq.recon.registry import get_pipeline
from reconq.scheduler.admission import Admission
from reconq.scheduler.estimate import EstimateError, estimate_bytes, estimate_seconds, history_seconds
from reconq.scheduler.routing import gpu_queue, waiting_score

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Estimate:
    bytes: int  # GPU memory
    seconds: float  # expected run time; 0: unknown


def scan_header(path: Path) -> Any:
    """The parsed MRD header of a stored raw file, read once per file and version: the jobs of a batch
    often share scans, and a stored scan does not change (a rewritten file has a new mtime or size).
    Only ``/dataset/xml`` is read (:func:`reconq.core.mrdfile.read_header`), never the readouts."""
    st = path.stat()
    return _read_header(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _read_header(path: str, mtime_ns: int, size: int) -> Any:
    return read_header(path)


def estimate_job(job: Job, scans: ScanStore, pipeline: Pipeline, store: JobStore, header: Any = None) -> Estimate:
    """The job's estimates, made from its scan's header (``header``, or read from the raw file) once and
    then kept on the job (with a log line)."""
    if job.mem_estimate_bytes > 0:
        return Estimate(job.mem_estimate_bytes, job.runtime_estimate_s)
    if header is None:
        header = scan_header(scans.raw_path(job.scan_id))
    need = estimate_bytes(header, job.params, pipeline)
    seconds = estimate_seconds(header, job.params, pipeline, history_seconds(store.redis, job.pipeline, job.protocol))
    store.update(job.id, mem_estimate_bytes=need, runtime_estimate_s=seconds)
    store.log(job.id, f"GPU memory estimate {need / 1e9:.1f} GB, run time "
                      f"{f'{seconds:.0f} s' if seconds else 'not known'}")
    job.mem_estimate_bytes, job.runtime_estimate_s = need, seconds
    return Estimate(need, seconds)


class Placement:
    """Submit-time placement for one submitting process (gateway, API, benchmark)."""

    def __init__(self, settings: Settings, store: JobStore, scans: ScanStore, sender: TaskSender) -> None:
        self.settings, self.store, self.scans, self.sender = settings, store, scans, sender
        self.admission = Admission(store.redis, settings.backfill_limit_s, settings.gpu_forget_s)

    def place_many(self, jobs: Sequence[Job], headers: Mapping[str, Any] | None = None) -> list[Job]:
        """Place queued jobs as one batch (the fills choose among all of them); returns those that should
        go to their priority queues instead (see the module doc). ``headers``: parsed MRD headers by scan
        id, where the caller has them (the gateway does), else they are read from the raw files."""
        if not self.settings.admission_control:
            return list(jobs)
        entries, rest = [], []
        for job in jobs:
            estimate = self._estimate(job, (headers or {}).get(job.scan_id))
            if estimate is None:
                rest.append(job)
            else:
                entries.append((job.id, estimate.bytes, waiting_score(job.queue, job.queued_at or 0.0),
                                estimate.seconds))
        if not entries:
            return rest
        unplaced, dispatched = self.admission.submit(entries)
        for other, gpu_id in dispatched:
            log.info("job %s: memory reserved on %s; sent to its queue", other, gpu_id)
            self.sender.send_current(self.store.redis, other, gpu_queue(gpu_id))
        left = set(unplaced)
        return rest + [job for job in jobs if job.id in left]

    def _estimate(self, job: Job, header: Any) -> Estimate | None:
        """The job's estimates, or None where a worker must make them (see the module doc)."""
        if any(job.params.get(p) for p in INPUT_PARAMS):
            return None
        try:
            pipeline = get_pipeline(job.pipeline)
        except ReconError:
            return None  # registered in the workers only (a plugin the submitter does not load)
        try:
            return estimate_job(job, self.scans, pipeline, self.store, header)
        except (EstimateError, ReconError, MrdFileError, OSError) as e:
            log.info("job %s: not placed at submit (%s); a worker estimates it", job.id, e)
        except Exception:  # a plugin's model may fail in any way: the worker fails the job saying why
            log.exception("job %s: estimate failed at submit; a worker estimates it", job.id)
        return None
