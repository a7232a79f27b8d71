"""Starts a Celery worker process for ReconQ's queues (``reconq worker``)."""

from __future__ import annotations

import logging
import os

from reconq.constants import QUEUE_ORDER
from reconq.settings import Settings
from workers.app import make_celery
from workers.tasks import register_tasks

log = logging.getLogger(__name__)


def worker_argv(concurrency: int, loglevel: str, name: str) -> list[str]:
    return [
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        "--queues=" + ",".join(q.value for q in QUEUE_ORDER),
        "--hostname=" + name,
        "--without-gossip",
        "--without-mingle",
        "--prefetch-multiplier=1",
    ]


def run_worker(settings: Settings, concurrency: int = 1, loglevel: str = "INFO", name: str | None = None) -> None:
    """Run a worker in this process until it is stopped (SIGTERM/SIGINT: warm shutdown)."""
    app = make_celery(settings)
    register_tasks(app, settings)
    name = name or f"cpu-{os.getpid()}@%h"
    log.info("worker %s: %d process(es), queues %s", name, concurrency, ",".join(QUEUE_ORDER))
    app.worker_main(worker_argv(concurrency, loglevel, name))
