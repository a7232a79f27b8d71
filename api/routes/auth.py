"""``/api/auth``: staff sign-in (a session cookie), sign-out, and who the API takes the viewer for."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request, Response

from reconq.api import auth
from reconq.api.deps import PrincipalDep, RedisDep, SettingsDep
from reconq.api.problems import INVALID, VIEW_ERRORS, problem
from reconq.api.schemas import Me, SignIn

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/auth", tags=["auth"], responses={**VIEW_ERRORS, **INVALID})


@router.post("/signin", response_model=Me, summary="Sign in as staff (sets a session cookie)",
             responses={401: problem("Wrong credentials"), 429: problem("Too many failed sign-ins")})
def sign_in(body: SignIn, request: Request, response: Response, settings: SettingsDep, client: RedisDep) -> Me:
    label = body.name if body.password else "<token>"
    if not (body.token or (body.name and body.password)):
        raise HTTPException(422, "give a name and password, or a token")
    if auth.too_many_failures(client, label):
        raise HTTPException(429, "too many failed sign-ins; wait a minute")
    if body.token:
        name = auth.token_owner(settings, body.token)
    else:
        stored = settings.staff_passwords.get(body.name)
        name = body.name if stored and auth.verify_secret(body.password, stored) else None
    if name is None:
        auth.record_failure(client, label)
        raise HTTPException(401, "wrong name, password or token")
    session = auth.start_session(client, name, settings.session_ttl_s)
    response.set_cookie(auth.SESSION_COOKIE, session, max_age=settings.session_ttl_s, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    log.info("staff %r signed in (%s)", name, "token" if body.token else "password")
    return Me(name=name, staff=True, public_read=settings.dashboard_public_read)


@router.post("/signout", response_model=Me, summary="End the dashboard session")
def sign_out(request: Request, response: Response, settings: SettingsDep, client: RedisDep) -> Me:
    cookie = request.cookies.get(auth.SESSION_COOKIE)
    if cookie:
        auth.end_session(client, cookie)
    response.delete_cookie(auth.SESSION_COOKIE)
    return Me(name="", staff=False, public_read=settings.dashboard_public_read)


@router.get("/me", response_model=Me, summary="Who the API takes this viewer for")
def me(who: PrincipalDep, settings: SettingsDep) -> Me:
    return Me(name=who.name, staff=who.staff, public_read=settings.dashboard_public_read)
