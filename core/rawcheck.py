"""What a raw MRD file that may have been cut off really holds: counts checked by reading, not by shape.

A gateway killed mid-scan (or a disk that filled up) leaves a file whose ``/dataset/data`` may claim
more rows than can be read: HDF5 writes its metadata (the dataset's shape, the chunk index, the heap
collections that hold the samples) when its cache evicts it, in no fixed order, so the shape on disk
can run ahead of the rows behind it. :func:`readable_counts` therefore reads rows: every row at the
start and the end of each chunk and the last one claimed; where one fails, it bisects down to the
first row that cannot be read. A row counts only if its header, its trajectory and its samples read
and their lengths agree with the header. The count is the number of rows from the first on that can
be read (``dset[:count]`` reads, row ``count`` does not, or is past the end).

:func:`readable_counts_isolated` does the same in a child process, so that a file damaged in a way
HDF5 does not survive (it can crash on some) costs the caller nothing but the answer (0, 0): the
gateway runs it on the scans it finds cut off when it starts.

``python -m reconq.core.rawcheck FILE`` prints the counts as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import h5py

log = logging.getLogger(__name__)

CHUNK_ROWS = 1024  # the rows of one chunk of /dataset/data as the gateway writes it
_CHILD_TIMEOUT_S = 300.0


def _acquisition_ok(row: Any) -> bool:
    head = row["head"]
    samples = int(head["number_of_samples"])
    return (len(row["data"]) == 2 * samples * int(head["active_channels"])
            and len(row["traj"]) == samples * int(head["trajectory_dimensions"]))


def _waveform_ok(row: Any) -> bool:
    head = row["head"]
    return len(row["data"]) == int(head["number_of_samples"]) * int(head["channels"])


def readable_rows(dset: h5py.Dataset, valid: Callable[[Any], bool], chunk_rows: int = CHUNK_ROWS) -> int:
    """How many rows of ``dset``, from the first, can be read and pass ``valid``."""
    n = int(dset.shape[0])

    def ok(i: int) -> bool:
        try:
            return bool(valid(dset[i]))
        except Exception:  # noqa: BLE001 - a row cut off can fail in many ways
            return False

    samples = sorted({i for k in range(0, n, chunk_rows) for i in (k, min(n, k + chunk_rows) - 1)})
    good = -1  # the last row known readable
    for i in samples:
        if ok(i):
            good = i
            continue
        bad = i  # rows good+1 .. bad: the first unreadable one lies here
        while bad - good > 1:
            mid = (good + bad) // 2
            if ok(mid):
                good = mid
            else:
                bad = mid
        return bad
    return n


def readable_counts(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(readouts, waveforms) readable from the first on in the raw file ``path``; (0, 0) where it does not open."""
    try:
        with h5py.File(os.fspath(path), "r") as f:
            group = f["dataset"]
            readouts = readable_rows(group["data"], _acquisition_ok) if "data" in group else 0
            waveforms = readable_rows(group["waveforms"], _waveform_ok) if "waveforms" in group else 0
            return readouts, waveforms
    except Exception as e:  # noqa: BLE001 - a file cut off mid-write may be unreadable in many ways
        log.warning("%s cannot be read (%s): no readouts counted", path, e)
        return 0, 0


def readable_counts_isolated(path: str | os.PathLike[str], timeout_s: float = _CHILD_TIMEOUT_S) -> tuple[int, int]:
    """:func:`readable_counts` in a child process: (0, 0) where the file crashes it or it does not answer."""
    if not os.path.exists(path):
        return 0, 0
    try:
        done = subprocess.run([sys.executable, "-m", "reconq.core.rawcheck", os.fspath(path)], capture_output=True,
                              timeout=timeout_s, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("%s could not be checked (%s): no readouts counted", path, e)
        return 0, 0
    try:
        answer = json.loads(done.stdout)
        return int(answer["readouts"]), int(answer["waveforms"])
    except (ValueError, KeyError, TypeError):
        log.warning("%s: the check ended with code %s (%s): no readouts counted", path, done.returncode,
                    done.stderr.decode(errors="replace").strip()[-300:])
        return 0, 0


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m reconq.core.rawcheck FILE", file=sys.stderr)
        return 2
    readouts, waveforms = readable_counts(argv[0])
    print(json.dumps({"readouts": readouts, "waveforms": waveforms}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
