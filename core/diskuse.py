"""What the data root holds on disk: the file system's size and free space (``os.statvfs``, read on every
call: :func:`file_system`), and the bytes and counts of raw scans and of result files (a walk of
``<data_dir>/scans``, kept for :data:`WALK_MAX_AGE_S` per process so that a dashboard polling a large root
does not walk it each time: :func:`disk_usage`).

```
<data_dir>/scans/<scan_id>/raw.h5              a raw scan (and .raw.h5.part while its file is being made)
<data_dir>/scans/<scan_id>/results/<job>.h5    a result file
```
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

#: Seconds a walk of the scans folder is reused for (per process and data dir).
WALK_MAX_AGE_S = 60.0
#: The names a scan's raw MRD file has: the file, and its temporary name while it is made.
RAW_NAMES = ("raw.h5", ".raw.h5.part")


@dataclass(frozen=True)
class FileCount:
    """Files of one kind: how many, and their bytes (as ``st_size``)."""

    count: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class FileSystem:
    """The size of a file system and its free space (``free_bytes``: what an unprivileged process may still
    write, ``f_bavail``, as :meth:`reconq.core.storage.ScanStore.free_bytes` and the gateway's scan refusal)."""

    total_bytes: int
    free_bytes: int
    used_bytes: int


@dataclass(frozen=True)
class DiskUsage:
    """The data root's file system (as :class:`FileSystem`) and what ReconQ keeps on it."""

    total_bytes: int
    free_bytes: int
    used_bytes: int
    raw: FileCount  # raw scans: one per scan folder that holds a raw file
    results: FileCount  # result files
    walked_at: float  # when the scans folder was walked (epoch seconds)


@dataclass(frozen=True)
class _Walk:
    raw: FileCount
    results: FileCount
    at: float  # time.time() of the walk
    mono: float  # time.monotonic() of the walk


_walks: dict[Path, _Walk] = {}
_lock = threading.Lock()


def _size(path: str) -> int | None:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except OSError:  # gone meanwhile (a retention purge), or not readable
        return None


def _result_files(folder: str) -> list[int]:
    try:
        with os.scandir(os.path.join(folder, "results")) as entries:
            return [e.stat(follow_symlinks=False).st_size for e in entries
                    if e.name.endswith(".h5") and e.is_file(follow_symlinks=False)]
    except OSError:
        return []


def walk_scans(scans: Path) -> tuple[FileCount, FileCount]:
    """Raw scans and result files under ``scans`` (the data root's ``scans`` folder), counted now."""
    raw_count = raw_bytes = result_count = result_bytes = 0
    try:
        with os.scandir(scans) as folders:
            names = [f.path for f in folders if f.is_dir(follow_symlinks=False) and not f.name.startswith(".")]
    except FileNotFoundError:
        names = []
    for folder in names:
        sizes = [s for s in (_size(os.path.join(folder, n)) for n in RAW_NAMES) if s is not None]
        if sizes:
            raw_count, raw_bytes = raw_count + 1, raw_bytes + sum(sizes)
        results = _result_files(folder)
        result_count, result_bytes = result_count + len(results), result_bytes + sum(results)
    return FileCount(raw_count, raw_bytes), FileCount(result_count, result_bytes)


def _walk(scans: Path, max_age_s: float) -> _Walk:
    with _lock:
        kept = _walks.get(scans)
        if kept is not None and time.monotonic() - kept.mono < max_age_s:
            return kept
    raw, results = walk_scans(scans)  # outside the lock: a slow walk does not hold up other roots
    walk = _Walk(raw, results, time.time(), time.monotonic())
    with _lock:
        _walks[scans] = walk
    return walk


def file_system(path: Path) -> FileSystem:
    """The file system that holds ``path``, now (``os.statvfs``: no walk). Raises OSError."""
    st = os.statvfs(path)
    return FileSystem(total_bytes=st.f_blocks * st.f_frsize, free_bytes=st.f_bavail * st.f_frsize,
                      used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize)


def disk_usage(data_dir: Path, max_age_s: float = WALK_MAX_AGE_S) -> DiskUsage:
    """The data root's file system (now) and its raw scans and result files (walked at most ``max_age_s``
    ago in this process; 0: walked now). Raises OSError where the data dir cannot be read."""
    fs = file_system(data_dir)
    walk = _walk(Path(data_dir).resolve() / "scans", max_age_s)
    return DiskUsage(total_bytes=fs.total_bytes, free_bytes=fs.free_bytes, used_bytes=fs.used_bytes,
                     raw=walk.raw, results=walk.results, walked_at=walk.at)
