"""Typed dependencies of the routes: the services :func:`reconq.api.app.create_api` put on ``app.state``,
and who is asking (a signed-in staff member or an anonymous viewer, see :mod:`reconq.api.auth`).

A route names what it needs by type (``store: JobStoreDep``, ``who: StaffDep``), never ``app.state``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam

from reconq.api.audit import AuditError, AuditLog
from reconq.api.auth import ACTION_HEADER, ANONYMOUS, SESSION_COOKIE, Principal, Role, StaffAuth
from reconq.api.schemas import Masker, View
from reconq.core.jobs import Job, JobStore
from reconq.core.mrdfile import parse_header, read_header, read_xml
from reconq.core.results import result_file
from reconq.core.settings import Settings
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.scheduler.actions import Actions

log = logging.getLogger(__name__)


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


def get_auth(request: Request) -> StaffAuth:
    return request.app.state.auth


def get_audit_log(request: Request) -> AuditLog:
    return request.app.state.audit


def get_masker(request: Request) -> Masker:
    return request.app.state.masker


def client_address(request: Request) -> str:
    """The client's address (a trusted proxy's X-Forwarded-For, as uvicorn reads it), for the sign-in limits."""
    return request.client.host if request.client is not None else "unknown"


def get_redis_url(request: Request) -> str:
    """The URL the event stream opens its own (asyncio) connection on."""
    return request.app.state.redis_url


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobStoreDep = Annotated[JobStore, Depends(get_jobs)]
ActionsDep = Annotated[Actions, Depends(get_actions)]
ScanStoreDep = Annotated[ScanStore, Depends(get_scans)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
RedisUrlDep = Annotated[str, Depends(get_redis_url)]
AuthDep = Annotated[StaffAuth, Depends(get_auth)]

JobId = Annotated[str, PathParam(min_length=1, max_length=200)]
ScanId = Annotated[str, PathParam(min_length=1, max_length=200)]


def current_principal(request: Request, auth: AuthDep) -> Principal:
    """The staff member signed in by cookie or bearer token, else :data:`ANONYMOUS`. An address that
    presented too many wrong tokens (or failed sign-ins) gets 429 for its bearer tokens until its window ends."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        address = client_address(request)
        wait = auth.bearer_blocked(address)
        if wait is not None:
            raise HTTPException(429, f"too many wrong tokens or sign-ins from this address; try again in {wait} s",
                                headers={"Retry-After": str(wait)})
        who = auth.bearer(header[7:].strip())
        if who is None:
            auth.bearer_failed(address)
            raise HTTPException(401, "the bearer token is not valid (unknown or expired)")
        return who
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        who = auth.session(cookie, via="cookie")
        if who is not None:
            return who
    return ANONYMOUS


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def viewer(settings: SettingsDep, who: PrincipalDep) -> Principal:
    """Anyone allowed to look: staff, or anyone when ``dashboard_public_read`` is on."""
    if not who.staff and not settings.dashboard_public_read:
        raise HTTPException(401, "sign in to view jobs (viewing without sign-in is switched off)")
    return who


def staff(request: Request, who: PrincipalDep) -> Principal:
    """A signed-in staff member, any role; cookie sessions must also send the action header to change
    anything."""
    if not who.staff:
        raise HTTPException(401, "sign in as staff to do this")
    if who.via == "cookie" and request.method != "GET" and request.headers.get(ACTION_HEADER) != "1":
        raise HTTPException(403, f"actions signed in by cookie must send the header {ACTION_HEADER}: 1")
    return who


def _needs(role: Role, who: Principal) -> Principal:
    if not who.may(role):
        raise HTTPException(403, f"{who.name} has the role {who.role}; this needs the role {role}"
                                 + (" or admin" if role != "admin" else ""))
    return who


def technologist(who: Annotated[Principal, Depends(staff)]) -> Principal:
    """A signed-in technologist or admin (retry, cancel, move, retro-recon)."""
    return _needs("technologist", who)


def admin(who: Annotated[Principal, Depends(staff)]) -> Principal:
    """A signed-in admin."""
    return _needs("admin", who)


ViewerDep = Annotated[Principal, Depends(viewer)]
#: Any signed-in staff member (viewer, technologist, admin): what carries patient data, downloads.
StaffDep = Annotated[Principal, Depends(staff)]
TechnologistDep = Annotated[Principal, Depends(technologist)]
AdminDep = Annotated[Principal, Depends(admin)]


def view_of(who: ViewerDep, masker: Annotated[Masker, Depends(get_masker)]) -> View:
    """How this viewer sees patient data: ``None`` (everything) for staff, the masker for anonymous viewers
    (:meth:`reconq.api.schemas.JobOut.of`)."""
    return None if who.staff else masker


#: How the viewer sees patient data (None: staff, unmasked).
ViewDep = Annotated[View, Depends(view_of)]


class Audit:
    """Records, in the audit log (:mod:`reconq.api.audit`), what this request's principal does to a job."""

    def __init__(self, log: AuditLog, who: Principal, address: str) -> None:
        self.log, self.who, self.address = log, who, address

    def noted(self, action: str, job_id: str, detail: str = "") -> None:
        """A view or an action: recorded; a line that cannot be written is logged (as an error) and the
        request goes ahead."""
        with contextlib.suppress(AuditError):  # logged (as an error) by AuditLog.record
            self.log.record(self.who, action, job_id, self.address, detail)

    def required(self, action: str, job_id: str, detail: str = "") -> None:
        """Patient data about to leave (a download, a preview): recorded first, or 503 and nothing leaves."""
        try:
            self.log.record(self.who, action, job_id, self.address, detail)
        except AuditError as e:
            raise HTTPException(503, f"{e}: patient data is served only when its access is recorded") from e


def audit_of(request: Request, who: PrincipalDep, log: Annotated[AuditLog, Depends(get_audit_log)]) -> Audit:
    return Audit(log, who, client_address(request))


#: The audit log, bound to who asks and from where.
AuditDep = Annotated[Audit, Depends(audit_of)]


class PatientNames:
    """Patients' names, for signed-in staff. Job and scan records keep the patient ID alone (no name goes
    through Redis), so the name is read from the scan's raw MRD header (``subjectInformation.patientName``,
    the header alone: :func:`reconq.core.mrdfile.read_header`), or from a done job's result file where the
    raw scan is gone (retention). Kept per scan (a stored scan's header does not change), at most
    :attr:`KEPT`; a scan whose header cannot be read (still being written, not there) is tried again after
    :attr:`RETRY_S`. Names are never logged, and never read for anonymous viewers."""

    KEPT = 4096
    RETRY_S = 15.0

    def __init__(self, scans: ScanStore) -> None:
        self.scans = scans
        self._kept: OrderedDict[str, tuple[str, float | None]] = OrderedDict()  # scan id -> (name, retry at)
        self._lock = threading.Lock()

    def of_job(self, job: Job) -> str:
        """The name of the job's patient ('' where no header of its scan names one)."""
        return self.of_scan(job.scan_id, job if job.state is JobState.DONE else None)

    def of_scans(self, scan_ids: Iterable[str]) -> str:
        """The first name that one of these scans (an exam's) gives ('' where none does)."""
        return next((name for name in map(self.of_scan, scan_ids) if name), "")

    def of_scan(self, scan_id: str, done: Job | None = None) -> str:
        with self._lock:
            kept = self._kept.get(scan_id)
            if kept is not None and (kept[1] is None or kept[1] > time.monotonic()):
                self._kept.move_to_end(scan_id)
                return kept[0]
        name, final = self._read(scan_id, done)
        with self._lock:
            self._kept[scan_id] = (name, None if final else time.monotonic() + self.RETRY_S)
            self._kept.move_to_end(scan_id)
            while len(self._kept) > self.KEPT:
                self._kept.popitem(last=False)
        return name

    def _read(self, scan_id: str, done: Job | None) -> tuple[str, bool]:
        """The name and whether it is final (a header was read); ('', False) where none could be."""
        try:
            raw = self.scans.raw_path(scan_id)
            if raw.is_file():
                header = read_header(raw)
            elif done is not None:
                xml = read_xml(result_file(self.scans, done))
                header = parse_header(xml, f"the result of job {done.id}")
            else:
                return "", False
        except (OSError, ValueError) as e:  # MrdFileError is a ValueError; its text may quote the header: not logged
            log.debug("scan %s: its patient's name cannot be read (%s)", scan_id, type(e).__name__)
            return "", False
        subject = header.subjectInformation
        return str(getattr(subject, "patientName", None) or ""), True


def get_patient_names(request: Request) -> PatientNames:
    return request.app.state.patient_names


#: Patients' names for staff (read only where the view is unmasked).
PatientNamesDep = Annotated[PatientNames, Depends(get_patient_names)]
