"""What every MRD session of one gateway shares: settings, stores, the allow-list, and how to queue."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reconq.core.jobs import Job, JobStore
from reconq.core.settings import Settings
from reconq.core.storage import ScanRecord, ScanStore
from reconq.gateway import protocol as p


@dataclass(frozen=True)
class SessionContext:
    """Built once by the gateway and handed to each session."""

    settings: Settings
    jobs: JobStore
    scans: ScanStore
    limits: p.Limits
    #: config names that run a pipeline (every registered pipeline and plugin)
    pipelines: frozenset[str]
    #: record and queue a complete scan's job (the scan's parsed header given); returns the job
    submit: Callable[[ScanRecord, Any], Job]
    #: record a scan's job as ``receiving`` while it streams in
    announce: Callable[[ScanRecord], None]
    #: False while the gateway knows Redis is unreachable: sessions then skip their best-effort Redis calls
    redis_up: Callable[[], bool]
