"""One router per resource (:func:`reconq.api.app.create_api` includes :data:`ROUTERS`)."""

from __future__ import annotations

from reconq.api.routes import actions, auth, events, exams, gpus, jobs, metrics, pages, retro, status

#: jobs, staff actions on them, retro-recon, exams, status panels, live events, GPUs, sign-in, metrics, pages
ROUTERS = (jobs.router, actions.router, retro.router, exams.router, status.router, events.router, gpus.router,
           auth.router, metrics.router, pages.router)
