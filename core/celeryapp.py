"""The Celery application on Redis, configured for long recon jobs that must never be lost."""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery
from kombu import Queue as KombuQueue

from reconq.core.constants import QUEUE_ORDER
from reconq.core.redisconn import celery_tls_options, require_redis_url
from reconq.core.settings import Settings, SettingsError


def soft_time_limit(hard_s: int) -> int:
    """Seconds after which a recon is told to stop: a minute (at most a tenth) before the hard limit."""
    return max(1, hard_s - max(1, min(60, hard_s // 10)))


def make_celery(settings: Settings, queues: Sequence[str] | None = None) -> Celery:
    """A Celery app on ``settings.redis_url``; tasks are registered by :func:`reconq.workers.tasks.register_tasks`.

    - ``acks_late`` + ``reject_on_worker_lost``: a job whose worker dies is delivered again;
    - prefetch 1: a worker holds no job it has not started, so another idle worker can take it;
    - a visibility timeout above the longest recon, so a running job is not redelivered meanwhile;
    - connects and replies bounded by ``redis_timeout_s``, so a send fails (``kombu.exceptions.OperationalError``)
      rather than hangs when Redis cannot be reached;
    - queues polled in priority order (``stat`` before ``routine`` before ``bulk``); a worker passes its
      own ``queues`` in the order it consumes them (see :mod:`reconq.scheduler.routing`);
    - ``rediss://``: the broker connection verifies the server's certificate against ``RECONQ_REDIS_CA_FILE``
      and its host name (kombu's default for ``rediss://`` is not to verify at all). There is no result
      backend (``task_ignore_result``, none configured), so no ``redis_backend_use_ssl`` to set.
    """
    if settings.visibility_timeout_s <= settings.job_time_limit_s:
        raise SettingsError(f"RECONQ_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s}) must exceed "
                            f"RECONQ_JOB_TIME_LIMIT_S ({settings.job_time_limit_s}), or running jobs are "
                            "delivered twice")
    names = list(queues) if queues is not None else [q.value for q in QUEUE_ORDER]
    url = require_redis_url(settings)
    app = Celery("reconq", broker=url, set_as_current=False)
    tls = celery_tls_options(settings, url)
    if tls is not None:
        app.conf.broker_use_ssl = tls
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_queues=[KombuQueue(q) for q in names],
        task_time_limit=settings.job_time_limit_s,
        # the soft limit comes first, so the job is marked failed (saying why) before the hard kill
        task_soft_time_limit=soft_time_limit(settings.job_time_limit_s),
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "queue_order_strategy": "priority",
            # kombu waits forever by default: a send to a Redis that hangs, or whose host is gone, would
            # hold the process's producer (and an MRD session's ack behind it) until the kernel gives up
            "socket_timeout": settings.redis_timeout_s,
            "socket_connect_timeout": settings.redis_timeout_s,
        },
        broker_connection_timeout=settings.redis_timeout_s,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        enable_utc=True,
    )
    return app
