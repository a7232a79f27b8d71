"""The complete scans in Redis, by patient, study and protocol: how a worker finds a job's reference scan.

Walking the local disk for "the newest complete scan of this protocol" finds nothing on a node that does
not see the shared data root, so a job would wait its whole ``RECONQ_INPUTS_WAIT_S`` and then fail saying
the scan was never acquired; and on a large root a waiting job's poll reads many records. The index
answers from Redis instead, and lets a worker tell "not acquired yet" from "acquired, but not on this
node's disk" (storage not shared):

- ``reconq:scanidx:<digest>`` (:data:`~reconq.core.constants.SCAN_INDEX`): a sorted set of scan ids scored
  by completion time, one per patient, study and protocol. The digest is a sha256 of the three, so no key
  holds an identifier in clear.
- ``reconq:scansindexed`` (:data:`~reconq.core.constants.SCANS_INDEXED`): scan id -> its digest and
  completion time, for every scan in the index (a scan named by id is known without a disk).

The gateway records each scan as it completes (:func:`record_scan`, best effort); the reconciler rebuilds
the index from disk (:func:`rebuild`), which fills in what Redis lost or missed and drops scans whose folder
is gone. The disk stays the truth: readers check the scan's own record before they use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from reconq.core.constants import SCAN_INDEX, SCANS_INDEXED
from reconq.core.storage import ScanRecord, ScanState, ScanStore

log = logging.getLogger(__name__)

_BATCH = 1000  # commands per pipeline round trip in a rebuild


@dataclass(frozen=True)
class Indexed:
    """A scan the index knows complete, and when it completed (epoch seconds)."""

    scan_id: str
    completed_at: float


def scan_digest(patient_id: str, study_uid: str, protocol: str) -> str:
    """The part of an index key that stands for a patient, study and protocol (no identifier in clear)."""
    return hashlib.sha256("\x1f".join((patient_id, study_uid, protocol)).encode()).hexdigest()[:32]


def _entry(record: ScanRecord) -> tuple[str, float]:
    digest = scan_digest(record.patient_id, record.study_uid, record.protocol)
    return digest, float(record.completed_at or record.created_at)


def _add(pipe: redis.client.Pipeline, scan_id: str, digest: str, completed_at: float) -> None:
    pipe.zadd(SCAN_INDEX + digest, {scan_id: completed_at})
    pipe.hset(SCANS_INDEXED, scan_id, json.dumps({"digest": digest, "completed_at": completed_at}))


def _remove(pipe: redis.client.Pipeline, scan_id: str, digest: str | None) -> None:
    if digest:
        pipe.zrem(SCAN_INDEX + digest, scan_id)
    pipe.hdel(SCANS_INDEXED, scan_id)


def record_scan(client: redis.Redis, record: ScanRecord) -> bool:
    """Put a complete scan in the index (others are left out); False, logged, where Redis is unreachable: the
    reconciler's :func:`rebuild` adds it later, and until then a worker finds it on its disk."""
    if record.state is not ScanState.COMPLETE:
        return False
    digest, completed_at = _entry(record)
    try:
        pipe = client.pipeline(transaction=True)
        _add(pipe, record.scan_id, digest, completed_at)
        pipe.execute()
    except redis.RedisError as e:
        log.warning("scan %s: not put in the scan index (%s); the reconciler adds it later", record.scan_id, e)
        return False
    return True


def forget(client: redis.Redis, scan_id: str) -> None:
    """Take a scan out of the index (its raw data purged, its folder gone): no job finds it as a reference.
    Raises redis.RedisError."""
    pipe = client.pipeline(transaction=True)
    _remove(pipe, scan_id, _digest_of(client.hget(SCANS_INDEXED, scan_id)))
    pipe.execute()


def newest(client: redis.Redis, patient_id: str, study_uid: str, protocol: str,
           exclude: str | None = None) -> Indexed | None:
    """The scan of this patient, study and protocol that completed last (not ``exclude``: the job's own scan);
    None where the index has none. Raises redis.RedisError."""
    for scan_id, score in client.zrevrange(SCAN_INDEX + scan_digest(patient_id, study_uid, protocol), 0, 1,
                                           withscores=True):
        if scan_id != exclude:
            return Indexed(scan_id, float(score))
    return None


def indexed(client: redis.Redis, scan_id: str) -> Indexed | None:
    """The index's entry for one scan id; None where it has none. Raises redis.RedisError."""
    raw = client.hget(SCANS_INDEXED, scan_id)
    if raw is None:
        return None
    try:
        return Indexed(scan_id, float(json.loads(raw)["completed_at"]))
    except (ValueError, KeyError, TypeError):
        return Indexed(scan_id, 0.0)


@dataclass(frozen=True)
class Rebuilt:
    added: int  # complete scans on disk that the index lacked (or had under another digest)
    removed: int  # indexed scans whose folder is gone from the data root


def rebuild(client: redis.Redis, scans: ScanStore, records: Iterable[ScanRecord] | None = None) -> Rebuilt:
    """Make the index match the complete scans on disk: add those it lacks, drop those whose scan folder is
    gone. Run by the reconciler, on the gateway's own (checked) data root; safe beside :func:`record_scan`
    (a scan recorded meanwhile has its folder, so it is never dropped). ``records``: the scans' records
    where the caller has read them already (default: read from ``scans``). Raises redis.RedisError."""
    known: dict[str, str] = client.hgetall(SCANS_INDEXED)
    seen: set[str] = set()
    pipe = client.pipeline(transaction=False)
    added = removed = 0
    for record in scans.scans() if records is None else records:
        if record.state is not ScanState.COMPLETE:
            continue
        seen.add(record.scan_id)
        digest, completed_at = _entry(record)
        old = _digest_of(known.get(record.scan_id))
        if old == digest:
            continue
        if old is not None:  # the scan's identity changed on disk: the disk is the truth
            _remove(pipe, record.scan_id, old)
        _add(pipe, record.scan_id, digest, completed_at)
        added += 1
        if len(pipe) >= _BATCH:
            pipe.execute()
    for scan_id in known.keys() - seen:
        try:
            present = scans.folder(scan_id).is_dir()
        except ValueError:  # not a scan id at all
            present = False
        if not present:
            _remove(pipe, scan_id, _digest_of(known[scan_id]))
            removed += 1
    pipe.execute()
    if added or removed:
        log.warning("scan index rebuilt from disk: %d scan(s) added, %d removed", added, removed)
    return Rebuilt(added, removed)


def _digest_of(raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        digest = json.loads(raw)["digest"]
    except (ValueError, KeyError, TypeError):
        return ""  # unreadable: rewritten by the rebuild
    return str(digest)
