"""Staff sign-in: hashed passwords and tokens from settings, sessions in Redis.

Secrets are never stored or logged in clear: settings hold ``scrypt$...`` password hashes and
``sha256$...`` token hashes (``python -m reconq.api.auth`` makes them); a dashboard session is a random
token in an HttpOnly cookie whose SHA-256 alone is kept in Redis, with a time to live.

A request is signed in by the session cookie or by ``Authorization: Bearer <token>`` (a staff token or
a session token). Requests signed in by cookie that change something must carry the header
``X-ReconQ-Action: 1``; a cross-site form cannot set it, so a cookie alone cannot be abused. The request's
:class:`Principal` is found by :func:`reconq.api.deps.current_principal`; the sign-in routes are in
:mod:`reconq.api.routes.auth`.
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
from typing import Literal

import redis

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


def session_key(token: str) -> str:
    """The Redis key of a session: the SHA-256 of its token, never the token."""
    return SESSION_KEY + hashlib.sha256(token.encode()).hexdigest()


def token_owner(settings: Settings, token: str) -> str | None:
    """The staff member whose API token this is, or None."""
    return next((name for name, h in settings.staff_tokens.items() if verify_secret(token, h)), None)


def _failures_key(name: str) -> str:
    return SIGNIN_FAILURES + hashlib.sha256(name.encode()).hexdigest()[:16]


def too_many_failures(client: redis.Redis, name: str) -> bool:
    """Whether sign-ins as ``name`` failed too often in the current minute to try again now."""
    return int(client.get(_failures_key(name)) or 0) >= MAX_FAILURES_PER_MINUTE


def record_failure(client: redis.Redis, name: str) -> None:
    """Count a failed sign-in as ``name`` (the count expires after a minute) and log it."""
    pipe = client.pipeline()
    pipe.incr(_failures_key(name))
    pipe.expire(_failures_key(name), 60)
    pipe.execute()
    log.warning("failed staff sign-in as %r", name)


def start_session(client: redis.Redis, name: str, ttl_s: int) -> str:
    """A new session token for ``name``; only its hash is kept, for ``ttl_s`` seconds."""
    token = secrets.token_urlsafe(32)
    client.set(session_key(token), name, ex=ttl_s)
    return token


def end_session(client: redis.Redis, token: str) -> None:
    client.delete(session_key(token))


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
