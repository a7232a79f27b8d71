"""ReconQ SENSE against BART on the same data, in the same run.

Cases: 2D 256 x 256, 16 coils, R = 4 (24 calibration lines); 3D 96 x 96 x 64 (``small``) and
192 x 192 x 128 (``full``), 16 coils, R = 2 x 2 (24 x 24 calibration lines). The data are a
Shepp-Logan phantom with birdcage maps (``recon.simulate.Body``) plus complex Gaussian noise.

Each tool gets the same undersampled k-space (zero where not sampled) and computes its own coil
maps from the calibration lines:

* ReconQ: ESPIRiT on a coarse grid of 48 points per axis, the pipeline default
  (``recon.coilmaps.espirit_maps``: sigpy's in 2D, the hybrid-space one in 3D; ``--espirit sigpy``
  times sigpy's in 3D too, the previous path), interpolated onto the image grid, then SENSE
  unfolding per readout column (Tikhonov 1e-4, the pipeline default);
* BART: ``bart ecalib -m1 -r 24`` then ``bart pics -S -l2 -r 0.001`` (CG-SENSE, 30 iterations);
  plus ``bart fft -u -i`` against ReconQ's FFT for the inverse transform of the full k-space.
  BART's ``ecalib`` takes minutes on the small 3D case and about an hour on the full one on a
  2-core machine, so BART runs on the full 3D case only with ``--bart-full``.

Reported: the machine, wall time of each step, the normalised RMS error of each magnitude against
the phantom (after a least-squares scale), and the time ratio BART / ReconQ.
Run: ``python bench/recon.py [--small | --full] [--only 2d|3d] [--bart-full] [--no-bart]``
(needs the ``bart`` command on PATH unless ``--no-bart``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# run as a script, this file's folder comes first on sys.path and its name shadows the package
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.tools import bart, machine, read_cfl, write_cfl  # noqa: E402
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


def reconq(ksp_us, mask, calib_mask, acs, accel, espirit="auto", lowres=None):
    """Maps from the calibration lines, then SENSE; returns ``(image, seconds for maps, for SENSE)``."""
    ncoil, nz, ny, nx = ksp_us.shape
    t0 = time.perf_counter()
    calib = ksp_us * calib_mask[None, :, :, None]
    mps = espirit_maps(calib, acs, lowres=lowres or 48, method=espirit)
    grid = Grid.make((0, 0, 0), np.eye(3), (1.0, 1.0, 1.0), (nz, ny, nx))
    spacing = np.asarray((nx, ny, nz), dtype=float) / np.asarray(mps.shape[1:][::-1])
    maps = GridMaps(mps, Grid.make((0, 0, 0), np.eye(3), spacing, mps.shape[1:]), grid)
    t1 = time.perf_counter()
    hybrid = fft.ifft(ksp_us * mask[None, :, :, None], axes=(-1,))
    img = sense_columns(hybrid, maps.batch, mask, accel, "unfold", lamda=1e-4, batch=32 if nz == 1 else 8)
    t2 = time.perf_counter()
    return img, t1 - t0, t2 - t1


def run_bart(folder: Path, ksp_us, full, acs, nz):
    """``(image, ecalib s, pics s, fft s)``; k-space in BART order ``[x, y, z, coil]``."""
    write_cfl(folder / "ksp", ksp_us)
    write_cfl(folder / "full", full)
    t_fft = bart("fft", "-u", "-i", "7" if nz > 1 else "3", str(folder / "full"), str(folder / "coilimg"))
    t_cal = bart("ecalib", "-m1", "-r", str(acs), str(folder / "ksp"), str(folder / "sens"))
    t_pics = bart("pics", "-S", "-l2", "-r", "0.001", str(folder / "ksp"), str(folder / "sens"), str(folder / "img"))
    return read_cfl(folder / "img"), t_cal, t_pics, t_fft


def case(name, shape, accel, acs=24, ncoil=16, noise=2e-4, with_bart=True, espirit="auto", lowres=None,
         no_bart=False):
    ksp, mask, calib_mask, truth = phantom_kspace(shape, ncoil, accel, acs, noise)
    sampled = mask | calib_mask
    ksp_us = ksp * sampled[None, :, :, None]
    nz = shape[0]
    t0 = time.perf_counter()
    fft.ifft(ksp, axes=(-3, -2, -1) if nz > 1 else (-2, -1))
    t_fft = time.perf_counter() - t0
    img, t_maps, t_sense = reconq(ksp_us, mask, calib_mask, acs, accel, espirit, lowres)
    ours = t_maps + t_sense
    label = f"ReconQ ({'sigpy ESPIRiT' if espirit == 'sigpy' or nz == 1 else 'hybrid ESPIRiT'})"
    rows = [(label, (t_maps, t_sense, ours, error(img, truth), t_fft))]
    if with_bart:
        with tempfile.TemporaryDirectory() as tmp:
            bimg, b_cal, b_pics, b_fft = run_bart(Path(tmp), ksp_us, ksp, acs, nz)
        rows.append(("BART (ecalib+pics)", (b_cal, b_pics, b_cal + b_pics, error(bimg, truth), b_fft)))
    print(f"\n{name}: {shape[::-1]} (x, y, z), {ncoil} coils, R = {accel[0]} x {accel[1]}, {acs} calibration lines")
    print(f"  {'':28s} {'maps s':>8s} {'SENSE s':>8s} {'total s':>8s} {'NRMSE':>8s} {'FFT s':>8s}")
    for label, row in rows:
        print(f"  {label:28s} " + " ".join(f"{v:8.{4 if i == 3 else 2}f}" for i, v in enumerate(row)))
    if with_bart:
        theirs = rows[1][1][2]
        print(f"  time ratio BART / ReconQ: {theirs / ours:.2f} (FFT {rows[1][1][4] / t_fft:.2f})")
    else:
        print("  BART not run on this case" + ("" if no_bart else " (--bart-full runs it)"))
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="the 3D case at 96 x 96 x 64 only")
    size.add_argument("--full", action="store_true", help="the 3D case at 192 x 192 x 128 only")
    parser.add_argument("--only", choices=["2d", "3d"], help="run one case")
    parser.add_argument("--bart-full", action="store_true", help="run BART on the full 3D case too (about an hour)")
    parser.add_argument("--no-bart", action="store_true", help="ReconQ alone")
    parser.add_argument("--espirit", choices=["auto", "hybrid", "sigpy"], default="auto",
                        help="ReconQ's 3D ESPIRiT (sigpy: the previous path)")
    parser.add_argument("--lowres", type=int, help="ReconQ's coarse map grid per axis (default 48)")
    args = parser.parse_args()
    if not args.no_bart and shutil.which("bart") is None:
        raise SystemExit("bart is not on PATH (Debian: apt-get install bart), or pass --no-bart")
    print(f"Machine: {machine()}")
    if not args.no_bart:
        version = subprocess.run(["bart", "version"], capture_output=True, text=True).stdout.strip()
        print(f"BART {version}")
    bart_on = not args.no_bart
    if args.only in (None, "2d"):
        case("2D", (1, 256, 256), (4, 1), with_bart=bart_on, lowres=args.lowres, no_bart=args.no_bart)
    if args.only in (None, "3d"):
        if not args.full:
            case("3D small", (64, 96, 96), (2, 2), with_bart=bart_on, espirit=args.espirit, lowres=args.lowres,
                 no_bart=args.no_bart)
        if not args.small:
            case("3D full", (128, 192, 192), (2, 2), with_bart=bart_on and args.bart_full, espirit=args.espirit,
                 lowres=args.lowres, no_bart=args.no_bart)


if __name__ == "__main__":
    main()
