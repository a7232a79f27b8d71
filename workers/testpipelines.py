"""Test pipelines for scheduling tests and benchmarks; registered only with
``RECONQ_ENABLE_TEST_PIPELINES=true``.

``sleep`` "reconstructs" by sleeping ``params["seconds"]`` while it declares ``params["memory_gb"]`` of
GPU memory through its own memory model, and returns one blank image. On a GPU worker it books that
memory in a simulated-use counter per GPU, and counts an over-commit whenever the booked total passes
the GPU's size: an independent check of admission. ``sleep_gpu_only`` is the same but may not run on
the CPU. Parameters: ``seconds``, ``memory_gb``, ``fail`` (raise a ReconError), ``kill`` (SIGKILL the
worker process running it), ``oom_times`` (raise a
simulated GPU out-of-memory error on the first n runs of the job, counted under ``oom_key``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ismrmrd
import numpy as np
import redis

from reconq.core.constants import GPU_TOTAL, KEY_PREFIX
from reconq.recon.errors import ReconError
from reconq.recon.pipeline import Pipeline, ProgressFn
from reconq.recon.rawdata import RawScan
from reconq.recon.registry import register
from reconq.scheduler.estimate import GB

#: Hash: gpu id -> bytes booked by running ``sleep`` jobs.
SIMULATED_USE = KEY_PREFIX + "test:simuse"
#: Hash: gpu id -> the largest booked total seen.
SIMULATED_PEAK = KEY_PREFIX + "test:simpeak"
#: Hash: gpu id -> how many times a booking took the GPU past its size.
OVERCOMMITS = KEY_PREFIX + "test:overcommits"
OOM_COUNTS = KEY_PREFIX + "test:oom"
#: Hash: raw file path -> how many runs of a ``sleep`` recon of that scan reached their end (fault tests
#: count executions with it: a job run to the end twice shows).
COMPLETED = KEY_PREFIX + "test:completed"


def retrying(call: Callable[[], Any], for_s: float = 120.0) -> Any:
    """``call()`` tried again while Redis is unavailable, for up to ``for_s`` seconds: the test pipelines'
    own bookkeeping must hold through the Redis outages the fault tests make."""
    deadline = time.monotonic() + for_s
    while True:
        try:
            return call()
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class SimulatedGpuOutOfMemory(MemoryError):
    """What a GPU out-of-memory error looks like to the worker (as cupy's ``OutOfMemoryError``)."""


class UseTracker:
    """Books the declared memory of running ``sleep`` jobs per GPU in Redis."""

    def __init__(self, client: redis.Redis, gpu_id: str) -> None:
        self.redis, self.gpu_id = client, gpu_id

    @contextlib.contextmanager
    def booked(self, nbytes: int) -> Iterator[None]:
        if not self.gpu_id:
            yield
            return
        used = int(retrying(lambda: self.redis.hincrby(SIMULATED_USE, self.gpu_id, nbytes)))
        total = int(self.redis.hget(GPU_TOTAL, self.gpu_id) or 0)
        peak = int(self.redis.hget(SIMULATED_PEAK, self.gpu_id) or 0)
        if used > peak:
            self.redis.hset(SIMULATED_PEAK, self.gpu_id, used)
        if total and used > total:
            self.redis.hincrby(OVERCOMMITS, self.gpu_id, 1)
        try:
            yield
        finally:  # through a Redis outage too (the fault tests make them): the booking must not stay
            retrying(lambda: self.redis.hincrby(SIMULATED_USE, self.gpu_id, -nbytes))


class SleepPipeline(Pipeline):
    """A timed sleep with a declared GPU memory need (see the module docstring)."""

    def __init__(self, name: str, tracker: UseTracker, cpu_capable: bool = True) -> None:
        self.name, self.tracker, self.cpu_capable = name, tracker, cpu_capable

    def memory_estimate(self, header: Any, params: Mapping[str, Any]) -> int:
        return int(float(params.get("memory_gb", 1.0)) * GB)

    def run(self, scan: RawScan, params: Mapping[str, Any], progress: ProgressFn) -> list[ismrmrd.Image]:
        if params.get("fail"):
            raise ReconError("sleep: failing as asked")
        if params.get("kill"):  # a poison job: the recon takes its worker process down with it
            os.kill(os.getpid(), signal.SIGKILL)
        oom_key = OOM_COUNTS + ":" + str(params.get("oom_key", scan.path))
        if int(params.get("oom_times", 0)) >= int(self.tracker.redis.incr(oom_key)):
            raise SimulatedGpuOutOfMemory(f"simulated GPU out of memory in {self.name}")
        seconds = float(params.get("seconds", 1.0))
        with self.tracker.booked(self.memory_estimate(scan.header, params)):
            t0 = time.monotonic()
            while (elapsed := time.monotonic() - t0) < seconds:
                progress(elapsed / seconds, "sleeping")
                time.sleep(min(0.05, seconds - elapsed))
        retrying(lambda: self.tracker.redis.hincrby(COMPLETED, str(scan.path), 1))
        image = ismrmrd.Image.from_array(np.zeros((4, 4), np.uint16))
        image.image_series_index = 1
        return [image]


def register_test_pipelines(client: redis.Redis, gpu_id: str) -> None:
    tracker = UseTracker(client, gpu_id)
    register(SleepPipeline("sleep", tracker))
    register(SleepPipeline("sleep_gpu_only", tracker, cpu_capable=False))
