"""Log lines that say which job they belong to, as text or as JSON (``RECONQ_LOG_FORMAT``).

A worker runs each job inside :func:`job_context`, which sets a contextvar; :class:`JobContextFilter`, on
every handler :func:`configure_logging` installs, copies its job id, scan id and worker name onto each
record logged meanwhile in that thread, the pipeline's and the plugins' lines included. No patient data is
added: a job id and a scan id are ReconQ's own identifiers.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s:%(job_marker)s %(message)s"


@dataclass
class JobContext:
    """The job the current thread runs; ``scan_id`` is filled in once the job record is read."""

    job_id: str
    scan_id: str | None = None
    worker: str | None = None


_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("reconq_job", default=None)


def current_job() -> JobContext | None:
    return _current.get()


@contextmanager
def job_context(job_id: str, scan_id: str | None = None, worker: str | None = None) -> Iterator[JobContext]:
    """Every line logged in this block (in this thread) carries ``job_id``, ``scan_id`` and ``worker``."""
    ctx = JobContext(job_id, scan_id, worker)
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


class JobContextFilter(logging.Filter):
    """Adds ``job_id``, ``scan_id``, ``worker`` (None outside a job) and ``job_marker`` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current.get()
        record.__dict__.update(job_id=ctx.job_id if ctx else None, scan_id=ctx.scan_id if ctx else None,
                               worker=ctx.worker if ctx else None,
                               job_marker=f" [job {ctx.job_id}]" if ctx else "")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, job_id, scan_id, worker, message."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "job_id": getattr(record, "job_id", None),
            "scan_id": getattr(record, "scan_id", None),
            "worker": getattr(record, "worker", None),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, with `` [job <id>]`` before the message of lines logged during a job."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "job_marker"):  # a handler without the filter
            JobContextFilter().filter(record)
        return super().format(record)


def make_formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def install(handler: logging.Handler, log_format: str) -> None:
    """Give ``handler`` the job filter and the formatter for ``log_format`` (``text`` or ``json``)."""
    if not any(isinstance(f, JobContextFilter) for f in handler.filters):
        handler.addFilter(JobContextFilter())
    handler.setFormatter(make_formatter(log_format))


def configure_logging(log_format: str = "text", level: int | None = None) -> None:
    """Install the filter and formatter on the root logger's handlers (a stderr one if it has none)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    if level is not None:
        root.setLevel(level)
    for handler in root.handlers:
        install(handler, log_format)
