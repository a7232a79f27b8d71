"""Staff sign-in: hashed passwords and tokens from settings, roles, sessions in Redis bound to their credential,
and sign-in limits taken before a password is checked.

Secrets are never stored or logged in clear: settings hold ``scrypt$...`` password hashes and
``sha256$...`` token hashes (``python -m reconq.api.auth`` makes them). A staff entry is either
``"name": "<hash>"`` (the old form: full rights, role ``admin``) or ``"name": {"hash": "<hash>", "role":
"viewer|technologist|admin"}``. A viewer may look at everything (identifiers unmasked, downloads); a
technologist may also retry, cancel, move and retro-recon jobs; an admin may do everything.

A dashboard session is a random token in an HttpOnly cookie whose SHA-256 alone is kept in Redis. The record
holds the staff name, which credential it came from and a **fingerprint**: an HMAC, with a server secret kept
in the data dir (never in Redis, :func:`load_secret`), of the session's key, the name and the credential's
current hash. Every request recomputes it from the configuration, so a session written into Redis by someone
who knows no credential, one copied to another key, or one of a staff member removed from the configuration
(or whose password changed) is refused and deleted. A session unused for ``session_idle_s`` ends (each request
refreshes it), and none outlives ``session_ttl_s``.

Sign-in limits (:meth:`StaffAuth.reserve`) are taken atomically in Redis (one Lua script) *before* the slow
password check, so parallel guesses are refused once the limit is reached: per client address (any name, and
tokens), per (name, address) pair, and per name over all addresses; past the last one only addresses the name
signed in from before may still try, so a stranger cannot lock a real user out from elsewhere. Unknown names
get a dummy check of the same cost, so timing does not tell which names exist.

A request is signed in by the session cookie or by ``Authorization: Bearer <token>`` (a staff token or
a session token). Requests signed in by cookie that change something must carry the header
``X-ReconQ-Action: 1``; a cross-site form cannot set it, so a cookie alone cannot be abused. The request's
:class:`Principal` is found by :func:`reconq.api.deps.current_principal`; the sign-in routes are in
:mod:`reconq.api.routes.auth`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import getpass
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import redis

from reconq.core.constants import SESSION_KEY, SIGNIN_FAILURES
from reconq.core.settings import Settings, SettingsError

log = logging.getLogger(__name__)

SESSION_COOKIE = "reconq_session"
ACTION_HEADER = "X-ReconQ-Action"
#: Secrets that must never guard a real installation (refused outside development).
PLACEHOLDERS = ("changethis", "changeme", "password", "secret", "admin", "reconq", "staff", "")
#: The shortest password ``python -m reconq.api.auth`` makes a hash of.
MIN_PASSWORD_LENGTH = 12

Role = Literal["viewer", "technologist", "admin"]
#: The roles, each allowed what those before it are allowed.
ROLES: tuple[Role, ...] = ("viewer", "technologist", "admin")
#: The role of a staff entry in the old form (a bare hash): today's full rights.
DEFAULT_ROLE: Role = "admin"

#: scrypt at OWASP's recommended parameters (N=2^17, r=8, p=1: 128 MiB and about half a second per check).
#: Older hashes keep verifying: their parameters are in the hash string.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
#: Parameters past these are refused rather than computed (a hash string names its own cost).
_MAX_SCRYPT_N, _MAX_SCRYPT_R, _MAX_SCRYPT_P = 2**20, 32, 16
#: At most this many password checks run at once (each holds 128 MiB): parallel sign-ins wait for a slot.
MAX_CONCURRENT_CHECKS = 4
_CHECKS = threading.BoundedSemaphore(MAX_CONCURRENT_CHECKS)

#: The file in the data dir holding the server secret that sessions and limit keys are bound with.
SECRET_FILE = "reconq-api-secret"
#: How long an address a name signed in from stays "known" to the per-name limit.
KNOWN_ADDRESS_S = 30 * 86400


def _scrypt_maxmem(n: int, r: int, p: int) -> int:
    return 128 * r * (n + p + 2) + (1 << 20)


def hash_password(password: str, salt: bytes | None = None, *, n: int = SCRYPT_N) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64) of ``password``."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=_scrypt_maxmem(n, SCRYPT_R, SCRYPT_P), dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def hash_token(token: str) -> str:
    """``sha256$<hex>`` of an API token (tokens are long and random, so a fast hash is enough)."""
    return "sha256$" + hashlib.sha256(token.encode()).hexdigest()


def _scrypt_parts(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    """The parameters, salt and digest of a ``scrypt$...`` hash, or None if it is malformed or too costly."""
    kind, _, rest = stored.partition("$")
    try:
        n_s, r_s, p_s, salt, digest = rest.split("$")
        n, r, p = int(n_s), int(r_s), int(p_s)
        parts = (n, r, p, base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True))
    except ValueError:  # binascii.Error too
        return None
    if kind != "scrypt" or not (2 <= n <= _MAX_SCRYPT_N and n & (n - 1) == 0 and 1 <= r <= _MAX_SCRYPT_R
                                and 1 <= p <= _MAX_SCRYPT_P and parts[4]):
        return None
    return parts


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches a stored ``scrypt$...`` or ``sha256$...`` hash (constant time; at most
    :data:`MAX_CONCURRENT_CHECKS` scrypt checks at once)."""
    kind = stored.partition("$")[0]
    if kind == "sha256":
        return hmac.compare_digest(hash_token(secret), stored)
    parts = _scrypt_parts(stored) if kind == "scrypt" else None
    if parts is None:
        return False
    n, r, p, salt, digest = parts
    with _CHECKS:
        got = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=_scrypt_maxmem(n, r, p),
                             dklen=len(digest))
    return hmac.compare_digest(got, digest)


@functools.cache
def _dummy_hash() -> str:
    """A hash at today's parameters that no password matches: what unknown names are checked against."""
    return hash_password(secrets.token_urlsafe(24))


@functools.lru_cache(maxsize=512)
def _is_placeholder(stored: str) -> bool:
    return any(verify_secret(p, stored) for p in PLACEHOLDERS)


@dataclass(frozen=True)
class Credential:
    """One configured staff credential: a password hash or a token hash, and its role."""

    name: str
    kind: Literal["password", "token"]
    hash: str
    role: Role


def credentials(entries: Mapping[str, object], kind: Literal["password", "token"]) -> dict[str, Credential]:
    """The staff entries of ``staff_passwords`` or ``staff_tokens``, both forms; raises :class:`SettingsError`
    on an entry that is neither."""
    setting = "RECONQ_STAFF_PASSWORDS" if kind == "password" else "RECONQ_STAFF_TOKENS"
    out = {}
    for name, entry in entries.items():
        if isinstance(entry, str):
            out[name] = Credential(name, kind, entry, DEFAULT_ROLE)
            continue
        if not isinstance(entry, Mapping) or set(entry) - {"hash", "role"} or not isinstance(entry.get("hash"), str):
            raise SettingsError(f"{setting}: the entry of {name!r} must be a hash or {{\"hash\": ..., \"role\": ...}}")
        role = entry.get("role")
        if role not in ROLES:
            raise SettingsError(f"{setting}: the role of {name!r} is {role!r}; roles are {', '.join(ROLES)}")
        out[name] = Credential(name, kind, cast(str, entry["hash"]), cast(Role, role))
    return out


def check_auth_settings(settings: Settings) -> None:
    """Refuse malformed entries and hashes, and placeholder secrets outside development (warn in development);
    warn of password hashes made with weaker parameters than today's."""
    creds = [*credentials(settings.staff_passwords, "password").values(),
             *credentials(settings.staff_tokens, "token").values()]
    for cred in creds:
        kind = cred.hash.partition("$")[0]
        if kind not in ("scrypt", "sha256") or (kind == "scrypt" and _scrypt_parts(cred.hash) is None):
            raise SettingsError(f"sign-in secret of {cred.name!r} is not a scrypt$/sha256$ hash "
                                "(make one with `python -m reconq.api.auth`)")
        if _is_placeholder(cred.hash):
            if settings.environment != "development":
                raise SettingsError(f"sign-in secret of {cred.name!r} is a placeholder; set a real one "
                                    "(placeholders are accepted only with RECONQ_ENVIRONMENT=development)")
            log.warning("sign-in secret of %r is a placeholder (accepted in development only)", cred.name)
        parts = _scrypt_parts(cred.hash) if kind == "scrypt" else None
        if parts is not None and parts[0] < SCRYPT_N:
            log.warning("the password hash of %r uses scrypt N=%d, weaker than today's N=%d: it still works; "
                        "make a new one with `python -m reconq.api.auth`", cred.name, parts[0], SCRYPT_N)
    _dummy_hash()  # made now, so that the first unknown name costs no more than the others


def load_secret(data_dir: Path) -> bytes:
    """The server secret in ``<data_dir>/reconq-api-secret`` (mode 0600), made once by the first API to start.

    It lives beside the data, not in Redis: whoever can write Redis cannot compute a session's fingerprint.
    Every API node of a shared data root reads the same file."""
    path = Path(data_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # a second API starting at once keeps the first's
                os.link(tmp, path)  # the file appears whole or not at all
        finally:
            tmp.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by others; making it 0600", path)
        try:
            path.chmod(0o600)
        except OSError as e:
            log.warning("cannot chmod %s: %s", path, e)
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except ValueError:
        secret = b""
    if len(secret) < 32:
        raise SettingsError(f"{path} does not hold a server secret (64 hex digits); remove it to make a new one "
                            "(every dashboard session ends)")
    return secret


@dataclass(frozen=True)
class Principal:
    """Who is making a request: a signed-in staff member with a role, or an anonymous viewer."""

    name: str
    staff: bool
    via: Literal["cookie", "bearer", "none"]
    role: Role | None = None

    def may(self, role: Role) -> bool:
        """Whether this principal has ``role`` or a higher one."""
        return self.role is not None and ROLES.index(self.role) >= ROLES.index(role)


ANONYMOUS = Principal("", staff=False, via="none")


def session_key(token: str) -> str:
    """The Redis key of a session: the SHA-256 of its token, never the token."""
    return SESSION_KEY + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Refusal:
    """A sign-in refused before any check: which limit, and in how many seconds to try again."""

    reason: str
    retry_after_s: int


# KEYS: address counter [, (name, address) counter, name counter, known-address flag]
# ARGV: address limit, window ms [, pair limit, name limit, name window ms]
# Refuses (returns {which, pttl}) when a limit is reached, else takes one from every counter: the check that
# follows is counted before it runs, so parallel attempts cannot all pass a limit read before any is written.
_RESERVE = """
local function over(key, limit) return tonumber(redis.call('GET', key) or '0') >= tonumber(limit) end
local function ttl(key) local t = redis.call('PTTL', key); if t < 0 then return 0 end; return t end
local function take(key, window) if redis.call('INCR', key) == 1 then redis.call('PEXPIRE', key, window) end end
if over(KEYS[1], ARGV[1]) then return {1, ttl(KEYS[1])} end
if #KEYS > 1 then
  if over(KEYS[2], ARGV[3]) then return {2, ttl(KEYS[2])} end
  if over(KEYS[3], ARGV[4]) and redis.call('EXISTS', KEYS[4]) == 0 then return {3, ttl(KEYS[3])} end
end
take(KEYS[1], ARGV[2])
if #KEYS > 1 then take(KEYS[2], ARGV[2]); take(KEYS[3], ARGV[5]) end
return {0, 0}
"""
# A successful sign-in gives back what it took (the (name, address) count starts again) and marks the
# address as one the name signs in from.  KEYS as above; ARGV: known-address lifetime ms.
_RELEASE = """
local function give(key)
  if tonumber(redis.call('GET', key) or '0') > 0 then redis.call('DECR', key) end
end
give(KEYS[1])
if #KEYS > 1 then redis.call('DEL', KEYS[2]); give(KEYS[3]); redis.call('SET', KEYS[4], '1', 'PX', ARGV[1]) end
return 1
"""
_REASONS = {1: "from this address", 2: "as this name from this address", 3: "as this name"}


class StaffAuth:
    """Credentials, sessions and sign-in limits of one API (on ``app.state.auth``)."""

    def __init__(self, settings: Settings, client: redis.Redis, secret: bytes) -> None:
        self.settings = settings
        self.redis = client
        self.secret = secret
        self.passwords = credentials(settings.staff_passwords, "password")
        self.tokens = credentials(settings.staff_tokens, "token")
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)

    # --- credentials -------------------------------------------------------------------------------------

    def password_credential(self, name: str, password: str) -> Credential | None:
        """The credential ``name`` and ``password`` sign in with, or None. An unknown name is checked against
        a dummy hash of the same cost, so the answer takes as long as for a known one."""
        cred = self.passwords.get(name)
        ok = verify_secret(password, cred.hash if cred is not None else _dummy_hash())
        return cred if ok and cred is not None else None

    def token_credential(self, token: str) -> Credential | None:
        """The staff token ``token`` is, or None (every configured token is compared)."""
        found = None
        for cred in self.tokens.values():
            if verify_secret(token, cred.hash) and found is None:
                found = cred
        return found

    def bearer(self, token: str) -> Principal | None:
        """Who a bearer token signs in: a staff token, or a session token."""
        cred = self.token_credential(token)
        if cred is not None:
            return Principal(cred.name, staff=True, via="bearer", role=cred.role)
        return self.session(token, via="bearer")

    # --- sessions ----------------------------------------------------------------------------------------

    def _fingerprint(self, key: str, cred: Credential) -> str:
        msg = "\0".join((key, cred.kind, cred.name, cred.hash)).encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def _idle_ms(self, started: float) -> int:
        left = self.settings.session_ttl_s - (time.time() - started)
        return max(1, int(1000 * min(self.settings.session_idle_s, left)))

    def start_session(self, cred: Credential) -> str:
        """A new session token for ``cred``; only its hash is kept, with the credential's fingerprint."""
        token = secrets.token_urlsafe(32)
        key = session_key(token)
        now = time.time()
        record = {"name": cred.name, "kind": cred.kind, "fp": self._fingerprint(key, cred), "started": now}
        self.redis.set(key, json.dumps(record), px=self._idle_ms(now))
        return token

    def session(self, token: str, via: Literal["cookie", "bearer"] = "cookie") -> Principal | None:
        """The staff member whose session ``token`` is, or None. A session that is forged, copied, past its
        lifetime, or made from a credential no longer configured as it was, is deleted; a valid one is kept
        for another ``session_idle_s``."""
        key = session_key(token)
        raw = self.redis.get(key)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            name, kind, fp, started = record["name"], record["kind"], record["fp"], float(record["started"])
        except (ValueError, TypeError, KeyError):
            name, kind, fp, started = "", "", "", 0.0
        cred = (self.passwords if kind == "password" else self.tokens if kind == "token" else {}).get(name)
        if cred is None or not isinstance(fp, str) or not hmac.compare_digest(fp, self._fingerprint(key, cred)):
            self.redis.delete(key)
            why = (f"staff {name!r} is no longer configured" if cred is None and name else
                   "its fingerprint does not match (forged, copied, or the credential changed)")
            log.warning("a session was refused and ended: %s", why)
            return None
        if time.time() - started >= self.settings.session_ttl_s:
            self.redis.delete(key)
            return None
        self.redis.pexpire(key, self._idle_ms(started))
        return Principal(cred.name, staff=True, via=via, role=cred.role)

    def end_session(self, token: str) -> None:
        self.redis.delete(session_key(token))

    # --- sign-in limits ----------------------------------------------------------------------------------

    def _key(self, kind: str, *parts: str) -> str:
        """A limit's Redis key: an HMAC of its parts, so Redis holds no staff name or client address."""
        digest = hmac.new(self.secret, "\0".join((kind, *parts)).encode(), hashlib.sha256).hexdigest()[:32]
        return f"{SIGNIN_FAILURES}{kind}:{digest}"

    def _keys(self, address: str, name: str | None) -> list[str]:
        keys = [self._key("addr", address)]
        if name is not None:
            keys += [self._key("pair", name, address), self._key("name", name), self._key("known", name, address)]
        return keys

    def reserve(self, address: str, name: str | None) -> Refusal | None:
        """Take one attempt from the limits of ``address`` (and of ``name`` from there, and of ``name``),
        before the credential is checked; a :class:`Refusal` when a limit is reached. ``name`` None: a token,
        limited per address only (so that changing the name does not escape a limit)."""
        s = self.settings
        args = [s.signin_max_per_address, 1000 * s.signin_window_s]
        if name is not None:
            args += [s.signin_max_per_name, s.signin_max_per_name_global, 1000 * s.signin_name_window_s]
        which, pttl = self._reserve(keys=self._keys(address, name), args=args)
        if int(which) == 0:
            return None
        return Refusal(_REASONS[int(which)], max(1, -(-int(pttl) // 1000)))

    def succeeded(self, address: str, name: str | None) -> None:
        """A sign-in passed its check: give back the attempt it took, and remember the address for ``name``."""
        self._release(keys=self._keys(address, name), args=[1000 * KNOWN_ADDRESS_S])

    def bearer_blocked(self, address: str) -> int | None:
        """Seconds until ``address`` may present bearer tokens again (too many wrong ones), or None."""
        key = self._key("addr", address)
        if int(self.redis.get(key) or 0) < self.settings.signin_max_per_address:
            return None
        return max(1, -(-int(self.redis.pttl(key)) // 1000))

    def bearer_failed(self, address: str) -> None:
        """Count a wrong bearer token against ``address``'s limit (as a failed sign-in)."""
        self.reserve(address, None)


def main(argv: list[str] | None = None) -> int:
    """``python -m reconq.api.auth [--token]``: print the hash of a password (asked for; at least
    12 characters) or of a new random API token."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--token", action="store_true", help="make a new random API token and its hash")
    args = parser.parse_args(argv)
    if args.token:
        token = secrets.token_urlsafe(32)
        print(f"token (give it to the client, keep it nowhere else): {token}")
        print(f"hash (for RECONQ_STAFF_TOKENS): {hash_token(token)}")
        return 0
    print(f"a password needs at least {MIN_PASSWORD_LENGTH} characters (a few words make a good one)")
    password = getpass.getpass("password: ")
    if len(password) < MIN_PASSWORD_LENGTH:
        print(f"too short: {len(password)} characters; at least {MIN_PASSWORD_LENGTH} are needed")
        return 1
    if password.strip().lower() in PLACEHOLDERS:
        print("that is a placeholder, refused outside development; choose another")
        return 1
    if password != getpass.getpass("again: "):
        print("the passwords differ")
        return 1
    print(f"hash (for RECONQ_STAFF_PASSWORDS): {hash_password(password)}")
    print('with a role: {"<name>": {"hash": "<the hash>", "role": "viewer|technologist|admin"}} '
          "(a bare hash: admin)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
