"""The dashboard's pages: the jobs table at ``/`` and one job at ``/jobs/<id>`` (static HTML whose
scripts, under ``/static``, read the API)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboard"
STATIC = DASHBOARD / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def index_page() -> FileResponse:
    return FileResponse(DASHBOARD / "index.html")


@router.get("/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    return FileResponse(DASHBOARD / "job.html")
