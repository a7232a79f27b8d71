"""``GET /api/exams``: one day's exams, their series, and when each series' images are expected (read
only: :func:`reconq.scheduler.exams.exams_of_day`)."""

from __future__ import annotations

import time
from datetime import date
from typing import Annotated

from fastapi import APIRouter, Query

from reconq.api.deps import JobStoreDep, PatientNamesDep, ViewDep
from reconq.api.problems import INVALID, VIEW_ERRORS
from reconq.api.schemas import ExamDay, ExamOut
from reconq.scheduler.exams import day_bounds, exams_of_day

router = APIRouter(prefix="/api/exams", tags=["exams"])


@router.get("", response_model=ExamDay, summary="One day's exams and when their images are expected",
            responses={**VIEW_ERRORS, **INVALID})
def list_exams(store: JobStoreDep, view: ViewDep, names: PatientNamesDep,
               day: Annotated[date | None, Query(description="YYYY-MM-DD (default: today, local time)")] = None,
               ) -> ExamDay:
    day = day or date.today()
    start, end = day_bounds(day)
    exams = exams_of_day(store, store.redis, start, end, time.time())
    return ExamDay(day=day.isoformat(), exams=[
        ExamOut.of(e, view, names.of_scans(s.scan_id for s in e.series) if view is None else "")
        for e in exams])
