"""The HTTP API (FastAPI) and the technologists' dashboard it serves, built by :func:`create_api`.

Built from services made once (:func:`reconq.services.make_api`) and kept on ``app.state``, where the
routes reach them through typed dependencies (:mod:`reconq.api.deps`); so tests need no monkeypatching.
Models are in :mod:`reconq.api.schemas`, one router per resource in :mod:`reconq.api.routes`, error
answers in :mod:`reconq.api.problems`.
"""

from __future__ import annotations

import base64
import hashlib
import re
import ssl
from typing import Any

import redis
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from reconq.api.audit import AuditLog
from reconq.api.auth import StaffAuth, check_auth_settings, load_secret
from reconq.api.deps import PatientNames, ViewerDep
from reconq.api.middleware import HttpSecurity
from reconq.api.problems import add_error_handlers
from reconq.api.routes import ROUTERS
from reconq.api.routes.pages import STATIC
from reconq.api.schemas import Masker
from reconq.core.jobs import JobStore
from reconq.core.settings import Settings, SettingsError
from reconq.core.storage import ScanStore
from reconq.scheduler.actions import Actions


def _redis_url(settings: Settings, client: redis.Redis) -> str:
    if settings.redis_url:
        return settings.redis_url
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def check_tls(settings: Settings) -> None:
    """Refuse a certificate without its key (or the other way round), a file that cannot be read, and a
    pair that does not load, each saying which."""
    cert, key = settings.tls_cert, settings.tls_key
    if cert is None and key is None:
        return
    if cert is None or key is None:
        given, missing = ("RECONQ_TLS_CERT", "RECONQ_TLS_KEY") if key is None else ("RECONQ_TLS_KEY", "RECONQ_TLS_CERT")
        raise SettingsError(f"{given} is set but {missing} is not: HTTPS needs both the certificate and its key")
    for name, path in (("RECONQ_TLS_CERT", cert), ("RECONQ_TLS_KEY", key)):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise SettingsError(f"{name} {path} cannot be read: {e.strerror or e}") from e
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise SettingsError(f"RECONQ_TLS_CERT {cert} and RECONQ_TLS_KEY {key} are not a PEM certificate and its "
                            f"unencrypted private key: {e}") from e


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What ``uvicorn.run`` needs beyond the app, host and port: TLS (when configured) and the proxies whose
    forwarded headers are believed."""
    check_tls(settings)
    options: dict[str, Any] = {"proxy_headers": True, "forwarded_allow_ips": list(settings.trusted_proxies)}
    if settings.tls_cert is not None:
        options.update(ssl_certfile=str(settings.tls_cert), ssl_keyfile=str(settings.tls_key))
    return options


def _swagger_page() -> HTMLResponse:
    """The OpenAPI page (development only): Swagger UI from its CDN, under a CSP that allows that CDN and, by
    hash, the page's own inline script, nothing else."""
    page = get_swagger_ui_html(openapi_url="/openapi.json", title="ReconQ API")
    body = bytes(page.body).decode()
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                      for m in re.findall(r"<script>(.*?)</script>", body, flags=re.S))
    cdn = "https://cdn.jsdelivr.net"
    page.headers["Content-Security-Policy"] = (
        f"default-src 'self'; script-src 'self' {cdn} {hashes}; style-src 'self' {cdn}; "
        "img-src 'self' data: https://fastapi.tiangolo.com; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
    return page


def create_api(settings: Settings, jobs: JobStore, scans: ScanStore, actions: Actions) -> FastAPI:
    """The API on these services (built by :func:`reconq.services.make_api`).

    ``/openapi.json`` is served to those who may view jobs; the Swagger page ``/docs`` (from a CDN) only with
    ``environment=development``."""
    check_auth_settings(settings)
    check_tls(settings)
    app = FastAPI(title="ReconQ", version="0.1.0", description="Asynchronous inline MRI reconstruction: "
                  "jobs, staff actions, live events and the technologists' dashboard",
                  openapi_url=None, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.jobs = jobs
    app.state.scans = scans
    app.state.actions = actions
    app.state.redis_url = _redis_url(settings, jobs.redis)
    secret = load_secret(settings.data_dir)
    app.state.auth = StaffAuth(settings, jobs.redis, secret)
    app.state.masker = Masker(secret)
    app.state.patient_names = PatientNames(scans)  # for staff: read from the scans' headers, kept per scan
    app.state.audit = AuditLog(settings.data_dir, jobs.redis)
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(who: ViewerDep) -> JSONResponse:
        return JSONResponse(app.openapi())

    if settings.environment == "development":
        app.get("/docs", include_in_schema=False)(_swagger_page)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(HttpSecurity, settings=settings)
    return app
