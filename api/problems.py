"""The error answers of the HTTP API: every 4xx answer, and the 503 while Redis is unavailable, is JSON with a
``detail`` that says what is wrong.

The services raise their own errors, without HTTP in them; this module chooses the status for each
(:data:`ACTION_ERROR_STATUS`) and turns request validation errors into one readable message.
"""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from reconq.scheduler.actions import ActionError, ActionRefused, InvalidAction, JobNotFound, ScanNotFound

log = logging.getLogger(__name__)


class Problem(BaseModel):
    detail: str = Field(description="What is wrong, in words")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationProblem(Problem):
    errors: list[FieldError] = Field(default_factory=list, description="Per field, when parameters are invalid")


def problem(description: str) -> dict[str, object]:
    """An OpenAPI ``responses`` entry for a :class:`Problem` answer."""
    return {"model": Problem, "description": description}


Responses = dict[int | str, dict[str, object]]

#: Routes that only look (status panels): refused to those not allowed to view.
VIEW_ERRORS: Responses = {401: problem("Not signed in")}
#: Routes that take parameters or a body.
INVALID: Responses = {422: {"model": ValidationProblem, "description": "Invalid parameters"}}
#: Routes on one job.
JOB_ERRORS: Responses = {**VIEW_ERRORS, 404: problem("No such job"), **INVALID}
#: Staff actions on a job.
ACTION_ERRORS: Responses = {**JOB_ERRORS, 403: problem("Missing action header, or a role that may not do this"),
                            409: problem("Not possible in the job's state")}

#: The HTTP status of each error of the staff actions (the most specific class listed wins).
ACTION_ERROR_STATUS: dict[type[ActionError], int] = {
    JobNotFound: 404,
    ScanNotFound: 404,
    ActionRefused: 409,
    InvalidAction: 422,
}


def action_error_status(exc: ActionError) -> int:
    """The status for ``exc``: that of its class or its nearest listed base; 400 for any other."""
    return next((ACTION_ERROR_STATUS[c] for c in type(exc).__mro__ if c in ACTION_ERROR_STATUS), 400)


async def _action_error(request: Request, exc: Exception) -> JSONResponse:
    """A refused staff action: its status and the message saying why (``detail``)."""
    assert isinstance(exc, ActionError)
    return JSONResponse({"detail": str(exc)}, status_code=action_error_status(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with one readable message (``detail``) and the field errors (``errors``)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', '')}" for e in errors]
    return JSONResponse({"detail": "; ".join(parts) or "invalid request",
                         "errors": [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors]},
                        status_code=422)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    """503 with the reason when Redis, which holds the job records, cannot be reached or answers an error:
    the dashboard says so, a client retries later."""
    log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": f"the job records cannot be read: Redis is unavailable ({type(exc).__name__}: "
                                   f"{exc}); try again in a moment"}, status_code=503, headers={"Retry-After": "5"})


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ActionError, _action_error)
    app.add_exception_handler(redis.ConnectionError, _redis_down)
    app.add_exception_handler(redis.TimeoutError, _redis_down)
    app.add_exception_handler(redis.BusyLoadingError, _redis_down)
