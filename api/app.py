"""The HTTP API (FastAPI) and the technologists' dashboard it serves, built by :func:`create_api`.

Built from services made once (:func:`reconq.services.make_api`) and kept on ``app.state``, where the
routes reach them through typed dependencies (:mod:`reconq.api.deps`); so tests need no monkeypatching.
Models are in :mod:`reconq.api.schemas`, one router per resource in :mod:`reconq.api.routes`, error
answers in :mod:`reconq.api.problems`.
"""

from __future__ import annotations

import redis
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from reconq.api.auth import check_auth_settings
from reconq.api.problems import add_error_handlers
from reconq.api.routes import ROUTERS
from reconq.api.routes.pages import STATIC
from reconq.core.jobs import JobStore
from reconq.core.settings import Settings
from reconq.core.storage import ScanStore
from reconq.scheduler.actions import Actions


def _redis_url(settings: Settings, client: redis.Redis) -> str:
    if settings.redis_url:
        return settings.redis_url
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def create_api(settings: Settings, jobs: JobStore, scans: ScanStore, actions: Actions) -> FastAPI:
    """The API on these services (built by :func:`reconq.services.make_api`)."""
    check_auth_settings(settings)
    app = FastAPI(title="ReconQ", version="0.1.0", description="Asynchronous inline MRI reconstruction: "
                  "jobs, staff actions, live events and the technologists' dashboard")
    app.state.settings = settings
    app.state.jobs = jobs
    app.state.scans = scans
    app.state.actions = actions
    app.state.redis_url = _redis_url(settings, jobs.redis)
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
