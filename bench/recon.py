"""ReconQ SENSE against BART on the same data, in the same run.

Cases: 2D 256 x 256, 16 coils, R = 4 (24 calibration lines), and 3D 192 x 192 x 128, 16 coils,
R = 2 x 2 (24 x 24 calibration lines); ``--small`` shrinks the 3D case to 96 x 96 x 64. The data are
a Shepp-Logan phantom with birdcage maps (``recon.simulate.Body``) plus complex Gaussian noise.

Each tool gets the same undersampled k-space (zero where not sampled) and computes its own coil
maps from the calibration lines:

* ReconQ: ESPIRiT (sigpy) on a coarse grid, then SENSE unfolding per readout column (Tikhonov
  1e-4, the pipeline default);
* BART: ``bart ecalib -m1 -r 24`` then ``bart pics -S -l2 -r 0.001`` (CG-SENSE, 30 iterations);
  plus ``bart fft -u -i`` against ReconQ's FFT for the inverse transform of the full k-space.

Reported: wall time of each step, the normalised RMS error of each magnitude against the phantom
(after a least-squares scale), and the time ratio BART / ReconQ.
Run: ``python bench/recon.py [--small]`` (needs the ``bart`` command on PATH).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# run as a script, this file's folder comes first on sys.path and its name shadows the package
sys.path[0] = str(Path(__file__).resolve().parents[1])

from reconq.recon import fft  # noqa: E402
from reconq.recon.coilmaps import GridMaps, espirit_maps  # noqa: E402
from reconq.recon.geometry import Grid  # noqa: E402
from reconq.recon.sense import sense_columns  # noqa: E402
from reconq.recon.simulate import Body  # noqa: E402


def phantom_kspace(shape, ncoil, accel, acs, noise, seed=0):
    """Fully sampled k-space ``(ncoil, nz, ny, nx)``, mask ``(nz, ny)``, truth ``(nz, ny, nx)``."""
    nz, ny, nx = shape
    grid = Grid.make((0, 0, 0), np.eye(3), (1.0, 1.0, 1.0), shape)
    body = Body(centre=np.zeros(3), axes=np.eye(3), semi_axes=np.array([nx / 2, ny / 2, max(nz / 2, 1.5)]),
                ncoil=ncoil)
    truth, mps = body.sample(grid)
    axes = (-3, -2, -1) if nz > 1 else (-2, -1)
    ksp = fft.fft(mps * truth, axes=axes).astype(np.complex64)
    rng = np.random.default_rng(seed)
    ksp += (noise * (rng.standard_normal(ksp.shape) + 1j * rng.standard_normal(ksp.shape))).astype(np.complex64)
    mask = np.zeros((nz, ny), dtype=bool)
    mask[(nz // 2) % accel[1]::accel[1], (ny // 2) % accel[0]::accel[0]] = True
    calib = np.zeros_like(mask)
    zs = slice(nz // 2 - acs // 2, nz // 2 + acs // 2) if nz > 1 else slice(None)
    calib[zs, ny // 2 - acs // 2: ny // 2 + acs // 2] = True
    return ksp, mask, calib, truth


def error(img, truth):
    mag = np.abs(img).ravel().astype(np.float64)
    ref = truth.ravel().astype(np.float64)
    scale = mag @ ref / max(mag @ mag, 1e-30)
    return float(np.linalg.norm(scale * mag - ref) / np.linalg.norm(ref))


def reconq(ksp_us, mask, calib_mask, acs, accel):
    """Maps from the calibration lines, then SENSE; returns ``(image, seconds for maps, for SENSE)``."""
    ncoil, nz, ny, nx = ksp_us.shape
    t0 = time.perf_counter()
    calib = ksp_us * calib_mask[None, :, :, None]
    mps = espirit_maps(calib, acs, lowres=48 if nz == 1 else 32)
    grid = Grid.make((0, 0, 0), np.eye(3), (1.0, 1.0, 1.0), (nz, ny, nx))
    spacing = np.asarray((nx, ny, nz), dtype=float) / np.asarray(mps.shape[1:][::-1])
    maps = GridMaps(mps, Grid.make((0, 0, 0), np.eye(3), spacing, mps.shape[1:]), grid)
    t1 = time.perf_counter()
    hybrid = fft.ifft(ksp_us * mask[None, :, :, None], axes=(-1,))
    img = sense_columns(hybrid, maps.batch, mask, accel, "unfold", lamda=1e-4, batch=32 if nz == 1 else 8)
    t2 = time.perf_counter()
    return img, t1 - t0, t2 - t1


def write_cfl(path: Path, array: np.ndarray) -> None:
    """BART's .cfl/.hdr: dims in Fortran order, i.e. our C-order shape reversed."""
    path.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(str(n) for n in array.shape[::-1]) + "\n")
    np.ascontiguousarray(array, dtype=np.complex64).tofile(path.with_suffix(".cfl"))


def read_cfl(path: Path) -> np.ndarray:
    dims = [int(n) for n in path.with_suffix(".hdr").read_text().splitlines()[1].split()]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return np.fromfile(path.with_suffix(".cfl"), dtype=np.complex64).reshape(dims[::-1])


def bart(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["bart", *args], check=True, capture_output=True)
    return time.perf_counter() - t0


def run_bart(folder: Path, ksp_us, full, acs, nz):
    """``(image, ecalib s, pics s, fft s)``; k-space in BART order ``[x, y, z, coil]``."""
    write_cfl(folder / "ksp", ksp_us)
    write_cfl(folder / "full", full)
    t_fft = bart("fft", "-u", "-i", "7" if nz > 1 else "3", str(folder / "full"), str(folder / "coilimg"))
    t_cal = bart("ecalib", "-m1", "-r", str(acs), str(folder / "ksp"), str(folder / "sens"))
    t_pics = bart("pics", "-S", "-l2", "-r", "0.001", str(folder / "ksp"), str(folder / "sens"), str(folder / "img"))
    return read_cfl(folder / "img"), t_cal, t_pics, t_fft


def case(name, shape, accel, acs=24, ncoil=16, noise=2e-4):
    ksp, mask, calib_mask, truth = phantom_kspace(shape, ncoil, accel, acs, noise)
    sampled = mask | calib_mask
    ksp_us = ksp * sampled[None, :, :, None]
    nz = shape[0]
    t0 = time.perf_counter()
    fft.ifft(ksp, axes=(-3, -2, -1) if nz > 1 else (-2, -1))
    t_fft = time.perf_counter() - t0
    img, t_maps, t_sense = reconq(ksp_us, mask, calib_mask, acs, accel)
    with tempfile.TemporaryDirectory() as tmp:
        bimg, b_cal, b_pics, b_fft = run_bart(Path(tmp), ksp_us, ksp, acs, nz)
    ours, theirs = t_maps + t_sense, b_cal + b_pics
    print(f"\n{name}: {shape[::-1]} (x, y, z), {ncoil} coils, R = {accel[0]} x {accel[1]}, {acs} calibration lines")
    print(f"  {'':22s} {'maps s':>8s} {'SENSE s':>8s} {'total s':>8s} {'NRMSE':>8s} {'FFT s':>8s}")
    for label, row in (("ReconQ (ESPIRiT+unfold)", (t_maps, t_sense, ours, error(img, truth), t_fft)),
                       ("BART (ecalib+pics)", (b_cal, b_pics, theirs, error(bimg, truth), b_fft))):
        print(f"  {label:22s} " + " ".join(f"{v:8.{4 if i == 3 else 2}f}" for i, v in enumerate(row)))
    print(f"  time ratio BART / ReconQ: {theirs / ours:.2f} (FFT {b_fft / t_fft:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="3D case 96 x 96 x 64 instead of 192 x 192 x 128")
    parser.add_argument("--only", choices=["2d", "3d"], help="run one case")
    args = parser.parse_args()
    if shutil.which("bart") is None:
        raise SystemExit("bart is not on PATH (Debian: apt-get install bart)")
    print(f"CPU threads: {len(os.sched_getaffinity(0))}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if args.only in (None, "2d"):
        case("2D", (1, 256, 256), (4, 1))
    if args.only in (None, "3d"):
        case("3D", (64, 96, 96) if args.small else (128, 192, 192), (2, 2))


if __name__ == "__main__":
    main()
