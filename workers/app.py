"""The Celery application on Redis, configured for long recon jobs that must never be lost."""

from __future__ import annotations

from celery import Celery
from kombu import Queue as KombuQueue

from reconq.constants import QUEUE_ORDER
from reconq.redisconn import require_redis_url
from reconq.settings import Settings


def make_celery(settings: Settings) -> Celery:
    """A Celery app on ``settings.redis_url``; tasks are registered by :func:`workers.tasks.register_tasks`.

    - ``acks_late`` + ``reject_on_worker_lost``: a job whose worker dies is delivered again;
    - prefetch 1: a worker holds no job it has not started, so another idle worker can take it;
    - a visibility timeout above the longest recon, so a running job is not redelivered meanwhile;
    - queues polled in priority order (``stat`` before ``routine`` before ``bulk``).
    """
    app = Celery("reconq", broker=require_redis_url(settings), set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_queues=[KombuQueue(q.value) for q in QUEUE_ORDER],
        task_time_limit=settings.job_time_limit_s,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        enable_utc=True,
    )
    return app
