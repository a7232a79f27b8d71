"""Other scans a job needs: a reference coil scan or a noise scan of the same patient and study.

A job names them in its parameters:

- ``reference_scan``: a scan id (of the same patient and study); or
- ``reference_protocol``: the protocol name of a scan of the same patient and study (the newest
  complete one is taken; the scanner may still be acquiring it when the job starts).

:func:`resolve_inputs` returns the parameters with ``reference`` set to that scan's raw file (a
``reference`` sent by a client is dropped: only this module names files), or raises
:class:`InputsNotReady` saying what the job waits for; the worker keeps the job ``waiting_inputs`` and
tries again, up to ``RECONQ_INPUTS_WAIT_S``.

Given the Redis client, a reference by protocol is looked up in the scan index
(:mod:`reconq.scheduler.scanindex`), and the disk is walked only where the index has none (Redis lost it,
or an older scan). A scan that Redis knows but this node's data root does not hold is not "missing": the
node does not see the shared storage, and the error says so (after :data:`VISIBILITY_GRACE_S`, which
covers a shared file system that shows a new folder late).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from reconq.core.constants import REFERENCE_PROTOCOL, REFERENCE_SCAN, SCAN_JOBS
from reconq.core.jobs import Job
from reconq.core.storage import ScanRecord, ScanState, ScanStore
from reconq.scheduler import scanindex
from reconq.scheduler.scanindex import Indexed

log = logging.getLogger(__name__)

#: How long after a scan completed its absence from this node's disk is waited for rather than an error:
#: an NFS client may cache a folder's listing for up to a minute (``acdirmax``).
VISIBILITY_GRACE_S = 90.0


class InputsNotReady(Exception):
    """A scan the job needs is not (yet) stored complete; the message says which."""


class InputsMissing(Exception):
    """A scan the job names cannot be used (it does not exist, or it was cut off)."""


def _newest_complete(scans: ScanStore, job: Job, protocol: str) -> ScanRecord | None:
    """The newest complete scan of ``protocol`` of the job's patient and study (the walk stops there:
    references are recent, so a waiting job's poll reads a few records, not the whole data root)."""
    for record in scans.scans(newest_first=True):
        if _fits(record, job, protocol):
            return record
    return None


def _fits(record: ScanRecord, job: Job, protocol: str) -> bool:
    return (record.state is ScanState.COMPLETE and record.protocol == protocol
            and record.patient_id == job.patient_id and record.study_uid == job.study_uid
            and record.scan_id != job.scan_id)


def _not_here(scans: ScanStore, hit: Indexed | None, scan_id: str) -> Exception:
    """The error for a scan that Redis knows but this node's data root does not hold."""
    root = scans.root.parent.absolute()
    mount = "mount the shared data root at RECONQ_DATA_DIR on every node"
    if hit is None:  # known by its jobs only: it may still be arriving on the gateway
        return InputsNotReady(f"reference scan {scan_id}: Redis has its job but it is not (yet) under this node's "
                              f"data root {root} (if storage is not shared, {mount})")
    age = time.time() - hit.completed_at
    if age < VISIBILITY_GRACE_S:
        return InputsNotReady(f"reference scan {scan_id}: recorded complete {max(age, 0.0):.0f} s ago but not yet "
                              f"under this node's data root {root} (if storage is not shared, {mount})")
    return InputsMissing(f"reference scan {scan_id} is recorded complete in Redis but is not under this node's data "
                         f"root {root}: storage is not shared with the gateway, or the shared data root is not "
                         f"mounted here; {mount}")


def _known_in_redis(client: redis.Redis | None, scan_id: str) -> tuple[bool, Indexed | None]:
    """Whether Redis knows the scan (in the scan index, or by a job made on it), and its index entry."""
    if client is None:
        return False, None
    try:
        hit = scanindex.indexed(client, scan_id)
        return hit is not None or bool(client.exists(SCAN_JOBS + scan_id)), hit
    except redis.RedisError as e:
        log.warning("scan index not read (%s): scan %s looked for on disk only", e, scan_id)
        return False, None


def _load(scans: ScanStore, client: redis.Redis | None, scan_id: str) -> ScanRecord:
    try:
        scans.folder(scan_id)
    except ValueError as e:  # not a scan id at all
        raise InputsMissing(f"reference scan {scan_id} does not exist") from e
    try:
        return scans.load(scan_id)
    except (ValueError, KeyError, TypeError) as e:  # a record that does not parse
        raise InputsMissing(f"reference scan {scan_id}: its scan.json cannot be read ({e})") from e
    except FileNotFoundError as e:
        known, hit = _known_in_redis(client, scan_id)
        if known:
            raise _not_here(scans, hit, scan_id) from e
        raise InputsMissing(f"reference scan {scan_id} does not exist") from e
    except OSError as e:  # the share lost under this node (a stale handle, an I/O error)
        raise InputsMissing(f"reference scan {scan_id} cannot be read under this node's data root "
                            f"{scans.root.parent.absolute()} ({e}): is the shared data root still mounted?") from e


def _by_protocol(scans: ScanStore, client: redis.Redis | None, job: Job, protocol: str) -> ScanRecord:
    """The newest complete scan of ``protocol`` of the job's patient and study: from the index, else the disk."""
    hit = None
    if client is not None:
        try:
            hit = scanindex.newest(client, job.patient_id, job.study_uid, protocol, exclude=job.scan_id)
        except redis.RedisError as e:
            log.warning("job %s: scan index not read (%s); looking for its reference on disk", job.id, e)
    if hit is not None:
        record = _load(scans, client, hit.scan_id)
        if _fits(record, job, protocol):
            return record
        log.warning("job %s: indexed scan %s does not match its record on disk; looking on disk", job.id, hit.scan_id)
    newest = _newest_complete(scans, job, protocol)
    if newest is None:
        raise InputsNotReady(f"a reference scan with protocol {protocol!r} of this patient and study")
    return newest


def resolve_inputs(job: Job, scans: ScanStore, client: redis.Redis | None = None) -> dict[str, Any]:
    """The job's parameters with ``reference`` (a raw file path) filled in where a reference is named.

    ``client``: Redis (``decode_responses``), for the scan index; without it only the disk is looked at.
    """
    params = dict(job.params)
    params.pop("reference", None)  # a file path: only ever set here, never taken from a client
    params.pop("sequence_dir", None)  # a folder: set by the worker from its settings alone
    scan_id, protocol = params.get(REFERENCE_SCAN), params.get(REFERENCE_PROTOCOL)
    if scan_id:
        record = _load(scans, client, str(scan_id))
        if (record.patient_id, record.study_uid) != (job.patient_id, job.study_uid):
            raise InputsMissing(f"reference scan {scan_id} is of another patient or study")
        if record.state is ScanState.INCOMPLETE:
            raise InputsMissing(f"reference scan {scan_id} is incomplete ({record.error})")
        if record.state is not ScanState.COMPLETE:
            raise InputsNotReady(f"reference scan {scan_id} (still being received)")
    elif protocol:
        record = _by_protocol(scans, client, job, str(protocol))
    else:
        return params
    params["reference"] = str(scans.raw_path(record.scan_id))
    return params
