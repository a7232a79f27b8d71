"""``GET /metrics``: Prometheus text (:mod:`reconq.api.prometheus`), open like ``/api/health``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from reconq.api import prometheus
from reconq.api.deps import JobStoreDep, SettingsDep
from reconq.api.schemas import TEXT
from reconq.scheduler.monitor import cluster_status

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": TEXT}}})
async def get_metrics(settings: SettingsDep, store: JobStoreDep) -> PlainTextResponse:
    def scrape() -> str:  # blocking Redis reads: off the event loop
        gpus = cluster_status(store.redis, forget_s=settings.gpu_forget_s).gpus
        return prometheus.render(store, gpus)

    text = await asyncio.to_thread(scrape)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
