"""Typed dependencies of the routes: the services :func:`reconq.api.app.create_api` put on ``app.state``,
and who is asking (a signed-in staff member or an anonymous viewer, see :mod:`reconq.api.auth`).

A route names what it needs by type (``store: JobStoreDep``, ``who: StaffDep``), never ``app.state``.
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam

from reconq.api.auth import ACTION_HEADER, ANONYMOUS, SESSION_COOKIE, Principal, session_key, token_owner
from reconq.core.jobs import JobStore
from reconq.core.settings import Settings
from reconq.core.storage import ScanStore
from reconq.scheduler.actions import Actions


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def get_scans(request: Request) -> ScanStore:
    return request.app.state.scans


def get_actions(request: Request) -> Actions:
    return request.app.state.actions


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.jobs.redis


def get_redis_url(request: Request) -> str:
    """The URL the event stream opens its own (asyncio) connection on."""
    return request.app.state.redis_url


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobStoreDep = Annotated[JobStore, Depends(get_jobs)]
ActionsDep = Annotated[Actions, Depends(get_actions)]
ScanStoreDep = Annotated[ScanStore, Depends(get_scans)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
RedisUrlDep = Annotated[str, Depends(get_redis_url)]

JobId = Annotated[str, PathParam(min_length=1, max_length=200)]
ScanId = Annotated[str, PathParam(min_length=1, max_length=200)]


def current_principal(request: Request, settings: SettingsDep, client: RedisDep) -> Principal:
    """The staff member signed in by cookie or bearer token, else :data:`ANONYMOUS`."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        token = auth[7:].strip()
        name = token_owner(settings, token) or client.get(session_key(token))
        if name is None:
            raise HTTPException(401, "the bearer token is not valid (unknown or expired)")
        return Principal(name, staff=True, via="bearer")
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        name = client.get(session_key(cookie))
        if name is not None:
            return Principal(name, staff=True, via="cookie")
    return ANONYMOUS


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def viewer(settings: SettingsDep, who: PrincipalDep) -> Principal:
    """Anyone allowed to look: staff, or anyone when ``dashboard_public_read`` is on."""
    if not who.staff and not settings.dashboard_public_read:
        raise HTTPException(401, "sign in to view jobs (viewing without sign-in is switched off)")
    return who


def staff(request: Request, who: PrincipalDep) -> Principal:
    """A signed-in staff member; cookie sessions must also send the action header."""
    if not who.staff:
        raise HTTPException(401, "sign in as staff to do this")
    if who.via == "cookie" and request.method != "GET" and request.headers.get(ACTION_HEADER) != "1":
        raise HTTPException(403, f"actions signed in by cookie must send the header {ACTION_HEADER}: 1")
    return who


ViewerDep = Annotated[Principal, Depends(viewer)]
StaffDep = Annotated[Principal, Depends(staff)]
