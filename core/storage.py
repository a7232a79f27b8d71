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
import re
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
    #: When retention deleted the raw file (epoch seconds; None: not deleted). The record then says
    #: ``incomplete`` (its ``error`` says why), so nothing queues, indexes or references the scan again;
    #: its folder stays for the results kept longer (:mod:`reconq.scheduler.retention`).
    raw_purged_at: float | None = None

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

    # --- deleting, for retention (reconq.scheduler.retention decides what and when) ---------------------

    def result_files(self, scan_id: str) -> list[Path]:
        """Every result file in the scan's ``results/`` folder (``<job>-run<n>.h5``, or ``<job>.h5`` of older
        versions), by name; temporary files being written (a leading dot) left out."""
        folder = self.folder(scan_id) / "results"
        if not folder.is_dir():
            return []
        return sorted(f for f in folder.iterdir() if f.suffix == ".h5" and not f.name.startswith("."))

    def job_result_files(self, scan_id: str, job_id: str) -> list[Path]:
        """The result files of one job: each run's ``<job_id>-run<n>.h5`` and an older ``<job_id>.h5``
        (``<scan>-j1`` does not take ``<scan>-j10``'s files)."""
        run = re.compile(re.escape(job_id) + r"-run[0-9]+\.h5")
        return [f for f in self.result_files(scan_id) if f.name == f"{job_id}.h5" or run.fullmatch(f.name)]

    def delete_file(self, path: Path) -> int:
        """Delete one file of this data root and make that durable; the bytes freed (0: it was gone).
        ValueError for a path outside the data root's scans."""
        path = Path(path)
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"{path} lies outside the data root's scans")
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        fsync_path(path.parent)
        return size

    def delete_raw(self, scan_id: str) -> int:
        """Delete the scan's raw file (its record and results stay); the bytes freed."""
        return self.delete_file(self.raw_path(scan_id))

    def remove_scan(self, scan_id: str) -> int:
        """Delete the scan's whole folder; the bytes freed. It is first renamed to a hidden name
        (``.removed-<scan_id>``), so no reader ever sees half a scan, then deleted (see
        :meth:`sweep_removed` for one left by a process stopped in between)."""
        folder = self.folder(scan_id)
        hidden = self.root / f".removed-{scan_id}"
        try:
            os.rename(folder, hidden)
        except FileNotFoundError:
            return 0
        fsync_path(self.root)
        size = _tree_bytes(hidden)
        shutil.rmtree(hidden)
        return size

    def sweep_removed(self) -> int:
        """Delete what :meth:`remove_scan` left half-deleted (a process stopped mid-way); the bytes freed."""
        freed = 0
        for hidden in self.root.glob(".removed-*"):
            freed += _tree_bytes(hidden)
            shutil.rmtree(hidden, ignore_errors=True)
        return freed


def _tree_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder``."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
