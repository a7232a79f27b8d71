"""The data root on disk: one folder per scan with its raw MRD file, its record and its results.

```
<data_dir>/scans/<scan_id>/raw.h5           the raw MRD file, never modified once complete
<data_dir>/scans/<scan_id>/scan.json        the scan record (state, config, params, identity, counts)
<data_dir>/scans/<scan_id>/results/<job>.h5 one MRD image file per job
```
Files are the durable truth: a scan is complete only once ``scan.json`` says so, which is written
(atomically, then fsynced) after the raw file itself was fsynced.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class ScanState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"


@dataclass
class ScanRecord:
    """What is known of one stored scan; saved as ``scan.json`` beside the raw file."""

    scan_id: str
    state: ScanState = ScanState.RECEIVING
    created_at: float = field(default_factory=time.time)
    completed_at: float | None = None
    client: str = ""
    config: str | None = None
    pipeline: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    patient_id: str = ""
    study_uid: str = ""
    protocol: str = ""
    measurement_id: str = ""
    acquisitions: int = 0
    waveforms: int = 0
    images: int = 0
    bytes_received: int = 0
    error: str | None = None

    @classmethod
    def from_json(cls, text: str) -> ScanRecord:
        data = json.loads(text)
        data["state"] = ScanState(data["state"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename or a new entry in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync it, rename, fsync the folder.

    Raises OSError (a full disk: ``ENOSPC``); ``path`` then still holds what it held, and the temporary
    file is gone."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
    fsync_path(path.parent)


class ScanStore:
    """The scans under one data root."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "scans"
        self.root.mkdir(parents=True, exist_ok=True)

    def new_scan_id(self) -> str:
        return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)

    def folder(self, scan_id: str) -> Path:
        if not scan_id or "/" in scan_id or scan_id.startswith("."):
            raise ValueError(f"not a scan id: {scan_id!r}")
        return self.root / scan_id

    def raw_path(self, scan_id: str) -> Path:
        return self.folder(scan_id) / "raw.h5"

    def result_path(self, scan_id: str, job_id: str) -> Path:
        return self.folder(scan_id) / "results" / f"{job_id}.h5"

    def stored(self, path: Path) -> str:
        """How a file of this data root is named in Redis: relative to the root (``scans/<id>/...``), so a
        node that mounts the shared root at another path finds it too."""
        return str(Path(path).resolve().relative_to(self.root.parent.resolve()))

    def resolve(self, stored: str) -> Path:
        """The file a path from Redis names, under this data root; ValueError for one that leaves it.

        Relative paths are the root's (:meth:`stored`). An absolute one (written by an older version, or
        by a node with the root elsewhere) is taken from its last ``scans/`` component on, under this root.
        """
        path = Path(stored)
        if path.is_absolute():
            parts = path.parts
            if "scans" not in parts:
                raise ValueError(f"{stored!r} is not a file of a data root")
            at = len(parts) - 1 - parts[::-1].index("scans")
            path = Path(*parts[at:])
        full = (self.root.parent / path).resolve()
        if not full.is_relative_to(self.root.resolve()):
            raise ValueError(f"{stored!r} lies outside the data root's scans")
        return full

    def create(self, record: ScanRecord) -> Path:
        folder = self.folder(record.scan_id)
        folder.mkdir(parents=True)
        (folder / "results").mkdir()
        self.save(record)
        fsync_path(self.root)
        return folder

    def save(self, record: ScanRecord) -> None:
        data = json.dumps(asdict(record), indent=1, default=str).encode()
        write_atomic(self.folder(record.scan_id) / "scan.json", data)

    def load(self, scan_id: str) -> ScanRecord:
        return ScanRecord.from_json((self.folder(scan_id) / "scan.json").read_text())

    def scans(self, newest_first: bool = False) -> Iterator[ScanRecord]:
        """Every scan with a readable record, oldest first (scan ids begin with their creation time)."""
        for folder in sorted(self.root.iterdir(), reverse=newest_first):
            if (folder / "scan.json").is_file():
                try:
                    yield self.load(folder.name)
                except (ValueError, KeyError, TypeError):
                    continue

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
