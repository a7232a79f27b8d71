"""Benchmark: what placement at submit pays to learn a stored scan's MRD header.

Placement estimates a job from its scan's header before the job is queued (the gateway has the header it
parsed; the API and the reconciler read it from the raw file). Writes a synthetic multi-slice scan of
about ``--mb`` MB, then times, over ``--repeat`` runs each (page cache warm, median and max):

- ``read_header``: :func:`reconq.core.mrdfile.read_header`, ``/dataset/xml`` alone, parsed (what
  placement uses);
- ``read_xml``: the same without parsing the XML;
- ``RawScan.open().header``: the raw scan a pipeline reads, which also loads every readout's header.

    python bench/header.py --mb 500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: the repository, not bench/

from reconq.core.mrdfile import read_header, read_xml  # noqa: E402
from reconq.recon.rawdata import RawScan  # noqa: E402
from reconq.recon.simulate import synthetic_scan, write_mrd  # noqa: E402


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, max) wall time of ``fn`` in milliseconds."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(runs), max(runs)


def header_of_raw_scan(path: Path) -> object:
    with RawScan.open(path) as scan:
        return scan.header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=500.0, help="size of the raw file (default 500 MB)")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    ncoil, matrix = 32, (256, 256)
    per_slice = ncoil * matrix[0] * 2 * matrix[1] * 8  # readout oversampling 2, complex64
    nslices = max(1, round(args.mb * 1e6 / per_slice))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_mrd(synthetic_scan(matrix=matrix, ncoil=ncoil, nslices=nslices), Path(tmp) / "raw.h5")
        size = path.stat().st_size / 1e6
        readouts = nslices * matrix[1]
        print(f"raw file: {size:.0f} MB, {readouts} readouts of {ncoil} coils, {nslices} slices")
        for name, fn in (("read_header (placement)", lambda: read_header(path)),
                         ("read_xml", lambda: read_xml(path)),
                         ("RawScan.open().header", lambda: header_of_raw_scan(path))):
            median, worst = timed(fn, args.repeat)
            print(f"  {name:26} median {median:8.2f} ms   max {worst:8.2f} ms")


if __name__ == "__main__":
    main()
