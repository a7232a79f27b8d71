"""Benchmark: the twix-like scan of a large raw MRD file against reading that file once with h5py.

Writes a synthetic 3D Cartesian scan (32 channels, 512 samples per readout, noise and reference
readouts included) of about ``--gb`` GiB, then, each in a fresh process:

- ``h5py``: ``f['/dataset/data'][:]``, every readout's header, trajectory and samples, read once;
- ``twix``: ``read_twix(path).image[...]``, the header mapped and all image data selected.

It prints wall times, their ratio, and each process's peak resident memory above what it held after
its imports (on Linux the peak is reset there, through /proc/self/clear_refs, so that import-time
garbage does not hide it; elsewhere ru_maxrss above the peak so far) and the peak of traced
allocations (tracemalloc, a separate run, since tracing slows the Python loops), next to the size of
the selected data, and what the twix reader held beyond it. The file is read from the page cache when
it fits in memory; both readers see the same cache state.

    python bench/twix.py --gb 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.hdf5
import ismrmrd.xsd as xsd
import numpy as np

NCHA, NCOL, NLIN = 32, 512, 256
NOISE, CALIB = ismrmrd.ACQ_IS_NOISE_MEASUREMENT, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING


def _header(npar: int) -> str:
    lim = xsd.limitType
    enc = xsd.encodingType(
        encodedSpace=xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=NCOL, y=NLIN, z=npar),
                                           fieldOfView_mm=xsd.fieldOfViewMm(x=512.0, y=256.0, z=npar)),
        reconSpace=xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=NCOL // 2, y=NLIN, z=npar),
                                         fieldOfView_mm=xsd.fieldOfViewMm(x=256.0, y=256.0, z=npar)),
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_1=lim(minimum=0, maximum=NLIN - 1, center=NLIN // 2),
            kspace_encoding_step_2=lim(minimum=0, maximum=npar - 1, center=npar // 2)),
        trajectory=xsd.trajectoryType.CARTESIAN,
    )
    hdr = xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=123_251_815),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(receiverChannels=NCHA),
        encoding=[enc],
    )
    return xsd.ToXML(hdr)


def write_scan(path: Path, gb: float, chunk: int = 1024, block: int = 256) -> int:
    """A synthetic raw MRD file of about ``gb`` GiB, written in blocks; returns the readout count."""
    per_readout = NCHA * NCOL * 8
    npar = max(1, round(gb * 2**30 / per_readout / NLIN))
    n_noise = 64
    heads = np.zeros(n_noise + npar * NLIN, ismrmrd.hdf5.acquisition_header_dtype)
    heads["version"] = 1
    heads["number_of_samples"], heads["active_channels"], heads["available_channels"] = NCOL, NCHA, NCHA
    heads["sample_time_us"], heads["center_sample"] = 2.5, NCOL // 2
    heads["flags"][:n_noise] = 1 << (NOISE - 1)
    lin, par = np.meshgrid(np.arange(NLIN), np.arange(npar), indexing="xy")
    heads["idx"]["kspace_encode_step_1"][n_noise:] = lin.ravel()
    heads["idx"]["kspace_encode_step_2"][n_noise:] = par.ravel()
    centre = n_noise + np.flatnonzero((abs(lin.ravel() - NLIN // 2) < 12) & (abs(par.ravel() - npar // 2) < 12))
    heads["flags"][centre] = 1 << (CALIB - 1)
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(2 * NCHA * NCOL * 16)).astype(np.float32)
    with h5py.File(path, "w") as f:
        group = f.create_group("dataset")
        group.create_dataset("xml", data=[_header(npar).encode()], dtype=h5py.string_dtype())
        ds = group.create_dataset("data", (len(heads),), maxshape=(None,), chunks=(chunk,),
                                  dtype=ismrmrd.hdf5.acquisition_dtype)
        for start in range(0, len(heads), block):
            stop = min(start + block, len(heads))
            rows = np.empty(stop - start, ismrmrd.hdf5.acquisition_dtype)
            rows["head"] = heads[start:stop]
            for i in range(stop - start):
                offset = ((start + i) * 9973) % (len(noise) - 2 * NCHA * NCOL)
                rows["data"][i] = noise[offset: offset + 2 * NCHA * NCOL]
                rows["traj"][i] = np.zeros(0, np.float32)
            ds[start:stop] = rows
    return len(heads)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _reset_peak() -> bool:
    """Reset the peak resident set to the current one (Linux); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _peak_kib(reset: bool) -> int:
    return (_status_kib("VmHWM") if reset else None) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure(reader: str, path: str, trace: bool) -> dict:
    from reconq.parametermaps import read_twix  # imported before the baseline, as h5py is

    reset = _reset_peak()
    base_rss = _peak_kib(reset)
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    if reader == "h5py":
        with h5py.File(path, "r") as f:
            data = f["dataset/data"][:]
        selected = sum(d.nbytes for d in data["data"])
    else:
        with read_twix(path) as twix:
            data = twix.image[...]
        selected = data.nbytes
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "selected_bytes": int(selected),
           "peak_rss_above_start": (_peak_kib(reset) - base_rss) * 1024}
    if trace:
        out["traced_peak"] = tracemalloc.get_traced_memory()[1]
    return out


def _run(reader: str, path: Path, trace: bool) -> dict:
    cmd = [sys.executable, __file__, "--measure", reader, "--path", str(path)]
    cmd += ["--trace"] if trace else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)


def _median(results: list[dict]) -> dict:
    """The run of median time, with the largest peak RSS of all runs."""
    mid = sorted(results, key=lambda r: r["seconds"])[len(results) // 2]
    return {**mid, "peak_rss_above_start": max(r["peak_rss_above_start"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="scan size in GiB (default 2)")
    parser.add_argument("--path", type=Path, default=Path(tempfile.gettempdir()) / "reconq_bench_twix.h5")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each reader (median)")
    parser.add_argument("--chunk", type=int, default=1024, help="rows per HDF5 chunk (the gateway's)")
    parser.add_argument("--reuse", action="store_true", help="use an existing file at --path")
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    parser.add_argument("--measure", choices=["h5py", "twix"], help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, str(args.path), args.trace)))
        return
    if not (args.reuse and args.path.exists()):
        t0 = time.perf_counter()
        n = write_scan(args.path, args.gb, args.chunk)
        size = args.path.stat().st_size / 2**30
        print(f"wrote {n} readouts, {size:.2f} GiB in {time.perf_counter() - t0:.1f} s")
    try:
        runs: dict[str, list[dict]] = {"h5py": [], "twix": []}
        for _ in range(args.repeat):  # alternating, so both see the same cache and memory state
            for reader, results in runs.items():
                results.append(_run(reader, args.path, trace=False))
        plain, twix = (_median(runs[r]) for r in ("h5py", "twix"))
        plain_traced = _run("h5py", args.path, trace=True)
        twix_traced = _run("twix", args.path, trace=True)
    finally:
        if not args.keep:
            args.path.unlink(missing_ok=True)
    mib = 2**20
    print(f"file: {args.gb:g} GiB requested, {os.cpu_count()} CPUs, median of {args.repeat} runs each")
    for name, r, t in (("h5py read once", plain, plain_traced), ("twix + image[...]", twix, twix_traced)):
        print(f"{name:>18}: {r['seconds']:7.2f} s  peak RSS +{r['peak_rss_above_start'] / mib:8.0f} MiB  "
              f"traced peak {t['traced_peak'] / mib:8.0f} MiB  selected {r['selected_bytes'] / mib:8.0f} MiB")
    print(f"time ratio twix / h5py: {twix['seconds'] / plain['seconds']:.2f}")
    print(f"twix peak RSS / selected data: {twix['peak_rss_above_start'] / twix['selected_bytes']:.3f} "
          f"({(twix['peak_rss_above_start'] - twix['selected_bytes']) / mib:+.1f} MiB); traced peak beyond "
          f"the selected data: {(twix_traced['traced_peak'] - twix_traced['selected_bytes']) / mib:+.1f} MiB")


if __name__ == "__main__":
    main()
