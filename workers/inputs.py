"""Other scans a job needs: a reference coil scan or a noise scan of the same patient and study.

A job names them in its parameters:

- ``reference_scan``: a scan id (of the same patient and study); or
- ``reference_protocol``: the protocol name of a scan of the same patient and study (the newest
  complete one is taken; the scanner may still be acquiring it when the job starts).

:func:`resolve_inputs` returns the parameters with ``reference`` set to that scan's raw file (a
``reference`` sent by a client is dropped: only this module names files), or raises
:class:`InputsNotReady` saying what the job waits for; the worker keeps the job ``waiting_inputs`` and
tries again, up to ``RECONQ_INPUTS_WAIT_S``.
"""

from __future__ import annotations

from typing import Any

from reconq.core.constants import REFERENCE_PROTOCOL, REFERENCE_SCAN
from reconq.core.jobs import Job
from reconq.core.storage import ScanRecord, ScanState, ScanStore


class InputsNotReady(Exception):
    """A scan the job needs is not (yet) stored complete; the message says which."""


class InputsMissing(Exception):
    """A scan the job names cannot be used (it does not exist, or it was cut off)."""


def _newest_complete(scans: ScanStore, job: Job, protocol: str) -> ScanRecord | None:
    """The newest complete scan of ``protocol`` of the job's patient and study (the walk stops there:
    references are recent, so a waiting job's poll reads a few records, not the whole data root)."""
    for record in scans.scans(newest_first=True):
        if (record.state is ScanState.COMPLETE and record.protocol == protocol
                and record.patient_id == job.patient_id and record.study_uid == job.study_uid
                and record.scan_id != job.scan_id):
            return record
    return None


def resolve_inputs(job: Job, scans: ScanStore) -> dict[str, Any]:
    """The job's parameters with ``reference`` (a raw file path) filled in where a reference is named."""
    params = dict(job.params)
    params.pop("reference", None)  # a file path: only ever set here, never taken from a client
    params.pop("sequence_dir", None)  # a folder: set by the worker from its settings alone
    scan_id, protocol = params.get(REFERENCE_SCAN), params.get(REFERENCE_PROTOCOL)
    if scan_id:
        try:
            record = scans.load(str(scan_id))
        except (FileNotFoundError, ValueError) as e:
            raise InputsMissing(f"reference scan {scan_id} does not exist") from e
        if (record.patient_id, record.study_uid) != (job.patient_id, job.study_uid):
            raise InputsMissing(f"reference scan {scan_id} is of another patient or study")
        if record.state is ScanState.INCOMPLETE:
            raise InputsMissing(f"reference scan {scan_id} is incomplete ({record.error})")
        if record.state is not ScanState.COMPLETE:
            raise InputsNotReady(f"reference scan {scan_id} (still being received)")
    elif protocol:
        newest = _newest_complete(scans, job, str(protocol))
        if newest is None:
            raise InputsNotReady(f"a reference scan with protocol {protocol!r} of this patient and study")
        record = newest
    else:
        return params
    params["reference"] = str(scans.raw_path(record.scan_id))
    return params
