"""Staff sign-in: hashed passwords and tokens from settings, sessions in Redis, FastAPI dependencies.

Secrets are never stored or logged in clear: settings hold ``scrypt$...`` password hashes and
``sha256$...`` token hashes (``python -m reconq.api.auth`` makes them); a dashboard session is a random
token in an HttpOnly cookie whose SHA-256 alone is kept in Redis, with a time to live.

A request is signed in by the session cookie or by ``Authorization: Bearer <token>`` (a staff token or
a session token). Requests signed in by cookie that change something must carry the header
``X-ReconQ-Action: 1``; a cross-site form cannot set it, so a cookie alone cannot be abused.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Annotated, Literal

import redis
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field

from reconq.api.problems import problem
from reconq.core.constants import SESSION_KEY, SIGNIN_FAILURES
from reconq.core.settings import Settings, SettingsError

log = logging.getLogger(__name__)

SESSION_COOKIE = "reconq_session"
ACTION_HEADER = "X-ReconQ-Action"
MAX_FAILURES_PER_MINUTE = 10
#: Secrets that must never guard a real installation (refused outside development).
PLACEHOLDERS = ("changethis", "changeme", "password", "secret", "admin", "reconq", "staff", "")

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64) of ``password``."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def hash_token(token: str) -> str:
    """``sha256$<hex>`` of an API token (tokens are long and random, so a fast hash is enough)."""
    return "sha256$" + hashlib.sha256(token.encode()).hexdigest()


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches a stored ``scrypt$...`` or ``sha256$...`` hash (constant time)."""
    kind, _, rest = stored.partition("$")
    if kind == "sha256":
        return hmac.compare_digest(hash_token(secret), stored)
    if kind == "scrypt":
        try:
            n, r, p, salt, digest = rest.split("$")
            got = hashlib.scrypt(secret.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                 dklen=len(base64.b64decode(digest)))
        except (ValueError, TypeError):
            return False
        return hmac.compare_digest(base64.b64encode(got).decode(), digest)
    return False


def check_auth_settings(settings: Settings) -> None:
    """Refuse malformed hashes, and placeholder secrets outside development (warn in development)."""
    for name, stored in {**settings.staff_passwords, **settings.staff_tokens}.items():
        if stored.partition("$")[0] not in ("scrypt", "sha256"):
            raise SettingsError(f"sign-in secret of {name!r} is not a scrypt$/sha256$ hash "
                                "(make one with `python -m reconq.api.auth`)")
        if any(verify_secret(p, stored) for p in PLACEHOLDERS):
            if settings.environment != "development":
                raise SettingsError(f"sign-in secret of {name!r} is a placeholder; set a real one "
                                    "(placeholders are accepted only with RECONQ_ENVIRONMENT=development)")
            log.warning("sign-in secret of %r is a placeholder (accepted in development only)", name)


@dataclass(frozen=True)
class Principal:
    """Who is making a request: a signed-in staff member, or an anonymous viewer."""

    name: str
    staff: bool
    via: Literal["cookie", "bearer", "none"]


ANONYMOUS = Principal("", staff=False, via="none")


class SignIn(BaseModel):
    """Sign in with a name and password, or with an API token."""

    name: str = Field("", max_length=100, description="Staff name (with `password`)")
    password: str = Field("", max_length=1000, description="Password (with `name`)")
    token: str = Field("", max_length=1000, description="API token (instead of name and password)")


class Me(BaseModel):
    """The viewer as the API sees it."""

    name: str
    staff: bool
    public_read: bool = Field(description="Whether viewing without sign-in is allowed")


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _redis(request: Request) -> redis.Redis:
    return request.app.state.jobs.redis


def _session_key(token: str) -> str:
    return SESSION_KEY + hashlib.sha256(token.encode()).hexdigest()


def _token_owner(settings: Settings, token: str) -> str | None:
    return next((name for name, h in settings.staff_tokens.items() if verify_secret(token, h)), None)


def current_principal(request: Request) -> Principal:
    """The staff member signed in by cookie or bearer token, else :data:`ANONYMOUS`."""
    settings, client = _settings(request), _redis(request)
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        token = auth[7:].strip()
        name = _token_owner(settings, token) or client.get(_session_key(token))
        if name is None:
            raise HTTPException(401, "the bearer token is not valid (unknown or expired)")
        return Principal(name, staff=True, via="bearer")
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        name = client.get(_session_key(cookie))
        if name is not None:
            return Principal(name, staff=True, via="cookie")
    return ANONYMOUS


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def viewer(request: Request, who: PrincipalDep) -> Principal:
    """Anyone allowed to look: staff, or anyone when ``dashboard_public_read`` is on."""
    if not who.staff and not _settings(request).dashboard_public_read:
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

auth_router = APIRouter(prefix="/api/auth", tags=["auth"])


def _check_rate(client: redis.Redis, name: str) -> None:
    key = SIGNIN_FAILURES + hashlib.sha256(name.encode()).hexdigest()[:16]
    if int(client.get(key) or 0) >= MAX_FAILURES_PER_MINUTE:
        raise HTTPException(429, "too many failed sign-ins; wait a minute")


def _fail(client: redis.Redis, name: str) -> HTTPException:
    key = SIGNIN_FAILURES + hashlib.sha256(name.encode()).hexdigest()[:16]
    pipe = client.pipeline()
    pipe.incr(key)
    pipe.expire(key, 60)
    pipe.execute()
    log.warning("failed staff sign-in as %r", name)
    return HTTPException(401, "wrong name, password or token")


@auth_router.post("/signin", response_model=Me, summary="Sign in as staff (sets a session cookie)",
                  responses={401: problem("Wrong credentials"), 429: problem("Too many failed sign-ins")})
def sign_in(body: SignIn, request: Request, response: Response) -> Me:
    settings, client = _settings(request), _redis(request)
    label = body.name if body.password else "<token>"
    if not (body.token or (body.name and body.password)):
        raise HTTPException(422, "give a name and password, or a token")
    _check_rate(client, label)
    if body.token:
        name = _token_owner(settings, body.token)
    else:
        stored = settings.staff_passwords.get(body.name)
        name = body.name if stored and verify_secret(body.password, stored) else None
    if name is None:
        raise _fail(client, label)
    session = secrets.token_urlsafe(32)
    client.set(_session_key(session), name, ex=settings.session_ttl_s)
    response.set_cookie(SESSION_COOKIE, session, max_age=settings.session_ttl_s, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    log.info("staff %r signed in (%s)", name, "token" if body.token else "password")
    return Me(name=name, staff=True, public_read=settings.dashboard_public_read)


@auth_router.post("/signout", response_model=Me, summary="End the dashboard session")
def sign_out(request: Request, response: Response) -> Me:
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        _redis(request).delete(_session_key(cookie))
    response.delete_cookie(SESSION_COOKIE)
    return Me(name="", staff=False, public_read=_settings(request).dashboard_public_read)


@auth_router.get("/me", response_model=Me, summary="Who the API takes this viewer for")
def me(request: Request, who: PrincipalDep) -> Me:
    return Me(name=who.name, staff=who.staff, public_read=_settings(request).dashboard_public_read)


def main(argv: list[str] | None = None) -> int:
    """``python -m reconq.api.auth [--token]``: print the hash of a password (asked for) or of a new token."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--token", action="store_true", help="make a new random API token and its hash")
    args = parser.parse_args(argv)
    if args.token:
        token = secrets.token_urlsafe(32)
        print(f"token (give it to the client, keep it nowhere else): {token}")
        print(f"hash (for RECONQ_STAFF_TOKENS): {hash_token(token)}")
        return 0
    password = getpass.getpass("password: ")
    if password != getpass.getpass("again: "):
        print("the passwords differ")
        return 1
    print(f"hash (for RECONQ_STAFF_PASSWORDS): {hash_password(password)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
