"""The audit log of patient data: who viewed a job's detail or preview, downloaded its images or DICOM, or
acted on it (retry, cancel, move, retro-recon), from where and when.

One JSON line per access in ``<data_dir>/audit/audit-YYYY-MM-DD.jsonl`` (the UTC day), written with one
``write`` on a file opened ``O_APPEND`` (mode 0600, its folder 0700): lines are only ever added, whole.
A line names the job by its id, never the patient's identifiers. Each line also goes on a capped Redis
stream (:data:`AUDIT_STREAM`) for a dashboard to read; the file is the record, the stream only a copy.

Rule: patient data leaves the API only when its audit line is written. A download or preview whose line
cannot be written is refused (503, :class:`AuditError`); a view of a job's detail or an action whose line
cannot be written is logged as an error and goes ahead.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import redis

from reconq.api.auth import Principal
from reconq.core.constants import KEY_PREFIX

log = logging.getLogger(__name__)

#: The Redis stream holding a copy of the newest audit lines, capped at :data:`STREAM_MAXLEN` (about).
AUDIT_STREAM = KEY_PREFIX + "audit"
STREAM_MAXLEN = 10_000
#: The folder under the data dir.
AUDIT_DIR = "audit"


class AuditError(RuntimeError):
    """An audit line could not be written to the file."""


def audit_file(data_dir: Path, when: datetime) -> Path:
    """The day's audit file (``when`` in UTC)."""
    return Path(data_dir) / AUDIT_DIR / f"audit-{when.strftime('%Y-%m-%d')}.jsonl"


class AuditLog:
    """Appends audit lines under ``data_dir`` and copies them to Redis (when given)."""

    def __init__(self, data_dir: Path, client: redis.Redis | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.redis = client
        self._lock = threading.Lock()

    def record(self, who: Principal, action: str, job_id: str, address: str, detail: str = "") -> dict[str, str]:
        """Append one line: ``who`` did ``action`` on ``job_id`` from ``address``, now. Raises
        :class:`AuditError` when the file cannot be written (a Redis failure is only logged)."""
        now = datetime.now(UTC)
        entry = {"at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "who": who.name if who.staff else "anonymous", "role": who.role or "none", "via": who.via,
                 "action": action, "job": job_id, "address": address}
        if detail:
            entry["detail"] = detail
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        path = audit_file(self.data_dir, now)
        try:
            with self._lock:
                self._append(path, line)
        except OSError as e:
            log.error("audit: cannot write %s (%s by %s on job %s): %s", path, action, entry["who"], job_id, e)
            raise AuditError(f"the audit log {path} cannot be written: {e.strerror or e}") from e
        if self.redis is not None:
            try:
                self.redis.xadd(AUDIT_STREAM, entry, maxlen=STREAM_MAXLEN, approximate=True)
            except redis.RedisError as e:
                log.warning("audit: line written to %s but not copied to Redis: %s", path, e)
        return entry

    @staticmethod
    def _append(path: Path, line: bytes) -> None:
        folder = path.parent
        if not folder.is_dir():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_mode & 0o077:
            folder.chmod(0o700)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
            written = os.write(fd, line)  # one write on O_APPEND: the line lands whole, after every other
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
        finally:
            os.close(fd)
