"""The API's HTTP hardening, one ASGI middleware in front of every route (:class:`HttpSecurity`):

- **Trusted hosts**: a request whose ``Host`` is not in ``allowed_hosts`` (default: ``http_host`` and the
  loopback names) gets 400, so a DNS-rebinding page cannot talk to the API under its own name.
- **Body-size limits**: a body past ``max_signin_body_bytes`` (``POST /api/auth/signin``) or
  ``max_body_bytes`` (everything else) gets 413, from its ``Content-Length`` before anything is read, and
  otherwise counted as it arrives (a chunked body is stopped at the limit, never read whole).
- **Security headers** on every answer: a Content-Security-Policy of ``default-src 'self'`` with
  ``frame-ancestors 'none'``, ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``,
  ``X-Frame-Options: DENY``; ``Cache-Control: no-store`` on everything but the static files (job records,
  previews, downloads and pages carry patient data); and HSTS whenever TLS is on (:func:`tls_on`).

Refusals are JSON ``{"detail": ...}`` like every other error of the API.
"""

from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reconq.core.settings import Settings

#: What every page and answer may load: its own origin only (and inline images: the pages' empty favicon);
#: never framed.
CSP = ("default-src 'self'; img-src 'self' data:; base-uri 'none'; object-src 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
HSTS = "max-age=31536000"
SIGNIN_PATH = "/api/auth/signin"
#: Names the API always answers to: loopback, and the name Starlette's test client sends (a single-label
#: name that no outside DNS answers for).
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "testserver")


def tls_on(settings: Settings, scheme: str) -> bool:
    """Whether clients reach the API over TLS: served directly (``tls_cert``), behind a TLS proxy
    (``behind_tls_proxy``), or this request came over HTTPS (also as a trusted proxy's X-Forwarded-Proto says)."""
    return settings.tls_cert is not None or settings.behind_tls_proxy or scheme in ("https", "wss")


def allowed_hosts(settings: Settings) -> tuple[str, ...]:
    """The host names the API answers to: ``allowed_hosts``, ``http_host`` and the loopback names (health
    checks on the machine itself). A wildcard bind such as 0.0.0.0 names no host that clients use: a server
    reached under its DNS name needs that name in ``allowed_hosts``."""
    return tuple(h.strip().lower().strip("[]") for h in (*settings.allowed_hosts, settings.http_host, *LOCAL_HOSTS))


def host_name(header: str) -> str:
    """The host name of a ``Host`` header, without its port (IPv6 literals without brackets)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") > 1:  # a bare IPv6 address (not valid in Host, but clear enough)
        try:
            return str(ipaddress.IPv6Address(header))
        except ValueError:
            return header
    return header.partition(":")[0]


def host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    for pattern in allowed:
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
            return True
    return False


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body passes its limit; answered 413 by the routes' error handling
    (FastAPI lets an HTTPException from the body through) or by :class:`HttpSecurity`."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the {limit} bytes allowed here")


class HttpSecurity:
    """Trusted hosts, body-size limits and security headers (see the module's description)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.hosts = allowed_hosts(settings)

    def limit(self, scope: Scope) -> int:
        s = self.settings
        return s.max_signin_body_bytes if scope["path"] == SIGNIN_PATH else s.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hsts = tls_on(self.settings, scope.get("scheme", "http"))
        no_store = not scope["path"].startswith("/static/")
        started = False

        async def send_secured(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", CSP)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "no-referrer"
                headers["Cross-Origin-Opener-Policy"] = "same-origin"
                if no_store:
                    headers["Cache-Control"] = "no-store"
                if hsts:
                    headers["Strict-Transport-Security"] = HSTS
            await send(message)

        request_headers = Headers(scope=scope)
        host = host_name(request_headers.get("host", ""))
        if not host_allowed(host, self.hosts):
            await JSONResponse({"detail": f"host {host!r} is not one this server answers to (RECONQ_ALLOWED_HOSTS)"},
                               status_code=400)(scope, receive, send_secured)
            return
        limit = self.limit(scope)
        declared = request_headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:  # before reading any
            await self._too_large(scope, receive, send_secured, limit)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, limited_receive, send_secured)
        except BodyTooLarge:
            if started:
                raise
            await self._too_large(scope, receive, send_secured, limit)

    @staticmethod
    async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        exc = BodyTooLarge(limit)
        await JSONResponse({"detail": exc.detail}, status_code=413, headers={"Connection": "close"})(
            scope, receive, send)
