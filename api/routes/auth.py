"""``/api/auth``: staff sign-in (a session cookie), sign-out, and who the API takes the viewer for.

A sign-in takes one attempt from its limits before the credential is checked (:meth:`StaffAuth.reserve`):
parallel guesses past a limit get 429 without a password check run for them."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request, Response

from reconq.api.auth import SESSION_COOKIE
from reconq.api.deps import AuthDep, PrincipalDep, SettingsDep, client_address
from reconq.api.middleware import tls_on
from reconq.api.problems import INVALID, VIEW_ERRORS, problem
from reconq.api.schemas import Me, SignIn

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/auth", tags=["auth"], responses={**VIEW_ERRORS, **INVALID})


@router.post("/signin", response_model=Me, summary="Sign in as staff (sets a session cookie)",
             responses={401: problem("Wrong credentials"), 413: problem("Body too large"),
                        429: problem("Too many failed sign-ins")})
def sign_in(body: SignIn, request: Request, response: Response, settings: SettingsDep, auth: AuthDep) -> Me:
    if not (body.token or (body.name and body.password)):
        raise HTTPException(422, "give a name and password, or a token")
    address = client_address(request)
    name = None if body.token else body.name  # a token is limited per address: no name to change
    refusal = auth.reserve(address, name)
    if refusal is not None:
        log.warning("sign-in as %r from %s refused: too many failed sign-ins %s", name or "<token>", address,
                    refusal.reason)
        raise HTTPException(429, f"too many failed sign-ins {refusal.reason}; try again in {refusal.retry_after_s} s",
                            headers={"Retry-After": str(refusal.retry_after_s)})
    cred = auth.token_credential(body.token) if body.token else auth.password_credential(body.name, body.password)
    if cred is None:
        log.warning("failed staff sign-in as %r from %s", name or "<token>", address)
        raise HTTPException(401, "wrong name, password or token")
    auth.succeeded(address, name)
    session = auth.start_session(cred)
    response.set_cookie(SESSION_COOKIE, session, max_age=settings.session_ttl_s, httponly=True, samesite="strict",
                        secure=tls_on(settings, request.url.scheme))
    log.info("staff %r (%s) signed in from %s (%s)", cred.name, cred.role, address, cred.kind)
    return Me(name=cred.name, staff=True, role=cred.role, public_read=settings.dashboard_public_read)


@router.post("/signout", response_model=Me, summary="End the dashboard session")
def sign_out(request: Request, response: Response, settings: SettingsDep, auth: AuthDep) -> Me:
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        auth.end_session(cookie)
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict",
                           secure=tls_on(settings, request.url.scheme))
    return Me(name="", staff=False, role=None, public_read=settings.dashboard_public_read)


@router.get("/me", response_model=Me, summary="Who the API takes this viewer for")
def me(who: PrincipalDep, settings: SettingsDep) -> Me:
    return Me(name=who.name, staff=who.staff, role=who.role, public_read=settings.dashboard_public_read)
