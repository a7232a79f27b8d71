"""``GET /metrics``: Prometheus text (:mod:`reconq.api.prometheus`), open like ``/api/health``."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from reconq.api import prometheus
from reconq.api.deps import JobStoreDep, SettingsDep
from reconq.api.schemas import TEXT
from reconq.core.diskuse import FileSystem, file_system
from reconq.scheduler.monitor import cluster_status

log = logging.getLogger(__name__)

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": TEXT}}})
async def get_metrics(settings: SettingsDep, store: JobStoreDep) -> PlainTextResponse:
    def scrape() -> str:  # blocking Redis reads: off the event loop
        gpus = cluster_status(store.redis, forget_s=settings.gpu_forget_s).gpus
        disk: FileSystem | None
        try:
            disk = file_system(settings.data_dir)
        except OSError as e:
            log.warning("metrics: the data dir %s cannot be read: %s", settings.data_dir, e)
            disk = None
        return prometheus.render(store, gpus, disk)

    text = await asyncio.to_thread(scrape)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
