"""One stack per data dir: an exclusive lock taken before anything touches the data dir.

``reconq up`` and ``reconq gateway`` each hold ``<data dir>/reconq.lock`` (an ``flock``, released by the
kernel when the process ends, however it ends) for as long as they run. A second start on the same data
dir is refused at once with a message naming the running one, before it starts a Redis, reconciles
scans or binds a port. The processes a ``reconq up`` starts (its gateway) take the lock of their parent.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import IO

LOCK_NAME = "reconq.lock"


class DataDirBusy(RuntimeError):
    """The data dir is held by another running ReconQ process; the message names it."""


class DataDirLock:
    """Holds the data dir's lock until :meth:`release` or the end of the process."""

    def __init__(self, data_dir: Path, what: str) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self.what = what
        self._file: IO[str] | None = None

    def acquire(self) -> DataDirLock:
        """Take the lock, or raise :class:`DataDirBusy` naming the process that holds it (a process of
        ours started by that holder, ``reconq up``'s gateway, goes ahead under its lock)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            f.close()
            if holder.get("pid") == os.getppid():
                return self  # started by the stack that holds it
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            raise DataDirBusy(f"the data dir {self.path.parent} is in use by `reconq {holder.get('what', '?')}` "
                              f"(pid {holder.get('pid', '?')}, since {since}); stop it first, or give this one "
                              f"another RECONQ_DATA_DIR") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "what": self.what, "since": time.time()}))
        f.flush()
        os.fchmod(f.fileno(), 0o600)
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _holder(f: IO[str]) -> dict:
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except ValueError:
        return {}
