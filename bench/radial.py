"""ReconQ's radial NUFFT reconstruction against BART on the same kooshball, in the same run.

Data: the 3D head phantom of ``recon.phantoms`` (analytic k-space, no NUFFT), ``--size`` cubed
(64), ``--coils`` coils (8), two echoes (TE 2 and 12 ms, two T2* values), a golden-means kooshball
at angular Nyquist (``ceil(pi/2 N^2)`` full spokes) with 2x readout oversampling (``2N`` samples a
spoke, ``dk = 0.5`` cycles per FOV). Both tools get the same trajectory and k-space:

* gridding: ReconQ ``radial.reconstruct`` (analytic DCF, ``niter=0``); BART ``nufft -a`` of the
  k-space multiplied by the same DCF (BART computes no DCF);
* iterative: ReconQ DCF-weighted CG, ``--niter`` iterations (Toeplitz normal operator); BART
  ``nufft -i`` (its CG on the unweighted normal equations, Toeplitz, its own iteration count).

Each tool's coil images are combined by root sum of squares. Reported: wall time (ReconQ's includes
the DCF, the plan and the Toeplitz kernel; BART's the whole command: reading/writing its files
too, so the file I/O is timed separately with ``bart scale 1``) and NRMSE against the phantom's
band-limited truth (the fully sampled Cartesian image), both raw and after a least-squares scale
(BART's NUFFT has its own scaling).

Run: ``python bench/radial.py [--size 64] [--coils 8] [--niter 10] [--eps 1e-4]`` (needs ``bart``).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: the repository, not bench/

from bench.tools import bart, machine, read_cfl, write_cfl  # noqa: E402
from reconq.recon import radial  # noqa: E402
from reconq.recon.phantoms import Phantom  # noqa: E402

TE = (2.0, 12.0)


def errors(img: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(raw NRMSE, NRMSE after a least-squares scale) over both echoes."""
    a, t = img.ravel().astype(np.float64), truth.ravel().astype(np.float64)
    raw = float(np.linalg.norm(a - t) / np.linalg.norm(t))
    scale = a @ t / max(a @ a, 1e-30)
    return raw, float(np.linalg.norm(scale * a - t) / np.linalg.norm(t))


def run_bart(folder: Path, coord, ksp, dcf, n: int):
    """``(gridding images, s, iterative images, s, file I/O s)``, images ``(necho, nz, ny, nx)``."""
    necho, ncoil, nspokes, ns = ksp.shape
    write_cfl(folder / "traj", coord[..., ::-1].astype(np.complex64))  # (3, ns, nspokes), x y z
    bart_ksp = ksp.reshape(necho, 1, ncoil, nspokes, ns, 1)  # dims [1, ns, nspokes, coil, 1, echo]
    write_cfl(folder / "ksp", bart_ksp)
    write_cfl(folder / "kspw", bart_ksp * dcf.reshape(1, 1, 1, nspokes, ns, 1))
    dims = f"{n}:{n}:{n}"
    t_io = bart("scale", "1", str(folder / "ksp"), str(folder / "copy"))
    t_grid = bart("nufft", "-a", "-d", dims, str(folder / "traj"), str(folder / "kspw"), str(folder / "grid"))
    t_iter = bart("nufft", "-i", "-t", "-d", dims, str(folder / "traj"), str(folder / "ksp"), str(folder / "iter"))

    def combine(name: str) -> np.ndarray:
        img = read_cfl(folder / name).reshape(necho, ncoil, n, n, n)
        return np.sqrt(np.sum(np.abs(img) ** 2, axis=1))

    return combine("grid"), t_grid, combine("iter"), t_iter, t_io


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="grid points per axis (default 64)")
    parser.add_argument("--coils", type=int, default=8, help="coils (default 8)")
    parser.add_argument("--niter", type=int, default=10, help="ReconQ CG iterations (default 10)")
    parser.add_argument("--eps", type=float, default=1e-4, help="ReconQ NUFFT tolerance (default 1e-4)")
    parser.add_argument("--threads", type=int, default=None, help="ReconQ threads (default: all cores)")
    parser.add_argument("--no-bart", action="store_true", help="ReconQ only")
    args = parser.parse_args()
    if not args.no_bart and shutil.which("bart") is None:
        raise SystemExit("bart is not on PATH (Debian: apt-get install bart)")
    n = args.size
    shape = (n, n, n)
    nspokes = math.ceil(math.pi / 2 * n * n)
    threads = args.threads or len(os.sched_getaffinity(0))
    print(f"Machine: {machine()}; finufft threads {threads}")
    print(f"Kooshball {n}^3, {args.coils} coils, {len(TE)} echoes (TE {TE[0]:g}, {TE[1]:g} ms), "
          f"{nspokes} spokes x {2 * n} samples ({nspokes * 2 * n} points a coil)")

    t0 = time.perf_counter()
    phantom = Phantom.default(3, ncoil=args.coils, seed=0, scale=np.prod(shape))
    coord = radial.kooshball(nspokes, 2 * n, n / 2)
    ksp = phantom.kspace(coord, TE)
    truth = np.stack([phantom.truth(shape, te) for te in TE])
    print(f"phantom k-space and truth: {time.perf_counter() - t0:.1f} s")

    rows = []
    t0 = time.perf_counter()
    grid = radial.reconstruct(coord, ksp, shape, "3d", radial.RadialOptions(eps=args.eps), threads=threads)
    rows.append(("ReconQ", "gridding (analytic DCF)", time.perf_counter() - t0, *errors(grid, truth)))
    t0 = time.perf_counter()
    it = radial.reconstruct(coord, ksp, shape, "3d", radial.RadialOptions(niter=args.niter, eps=args.eps),
                            threads=threads)
    rows.append(("ReconQ", f"CG, {args.niter} iterations, Toeplitz", time.perf_counter() - t0, *errors(it, truth)))
    t0 = time.perf_counter()
    it = radial.reconstruct(coord, ksp, shape, "3d",
                            radial.RadialOptions(niter=args.niter, eps=args.eps, toeplitz=False), threads=threads)
    rows.append(("ReconQ", f"CG, {args.niter} iterations, NUFFT pairs", time.perf_counter() - t0,
                 *errors(it, truth)))
    io = None
    if not args.no_bart:
        dcf = radial.analytic_dcf(coord, "3d")
        with tempfile.TemporaryDirectory() as tmp:
            bgrid, t_grid, biter, t_iter, io = run_bart(Path(tmp), coord, ksp, dcf, n)
        rows.append(("BART", "nufft -a (same DCF)", t_grid, *errors(bgrid, truth)))
        rows.append(("BART", "nufft -i -t", t_iter, *errors(biter, truth)))

    print(f"\n  {'tool':7s} {'recon':34s} {'time s':>8s} {'NRMSE':>8s} {'NRMSE*':>8s}")
    for tool, what, seconds, raw, scaled in rows:
        print(f"  {tool:7s} {what:34s} {seconds:8.2f} {raw:8.4f} {scaled:8.4f}")
    print("  NRMSE* after a least-squares scale; both over the two echoes' root-sum-of-squares images")
    if io is not None:
        print(f"  BART file I/O (bart scale 1 of the k-space): {io:.2f} s")
        print(f"  time ratio BART / ReconQ: gridding {rows[3][2] / rows[0][2]:.2f}, "
              f"iterative {rows[4][2] / rows[1][2]:.2f}")


if __name__ == "__main__":
    main()
