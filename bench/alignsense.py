"""AlignSENSE (motion-corrected SENSE): time to converge and accuracy on analytic moving phantoms.

Cases: 2D 256 x 256, 16 coils, 8 shots, and 3D 128 x 128 x 96, 16 coils, 16 shots (``--small``: 3D
48 x 48 x 40, 8 coils, 8 shots). Data: the head phantom of ``recon.phantoms`` (resized to 0.7 of the
FOV, 0.6 in 3D, blurred by 1.5 voxels so that its spectrum is inside the grid), each shot the analytic
k-space of the phantom moved analytically (coils fixed in the scanner frame), shots in random order,
motion uniform within 4 voxels and 5 degrees (shot 0 at rest: the reference). Noise-free unless
``--snr`` (dB, noise power over the sampled k-space).

Reported per case and device: wall time of :func:`align_sense` (DISORDER thresholds 0.05 voxel and
0.02 degree), outer iterations per level, the largest per-shot translation and rotation errors, and
the NRMSE of the image against the truth, next to uncorrected SENSE's.

Run: ``python bench/alignsense.py [--small] [--only 2d|3d] [--snr DB]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: the repository, not bench/

from bench.tools import machine  # noqa: E402
from reconq.recon import alignsense, motion  # noqa: E402
from reconq.recon.phantoms import Phantom  # noqa: E402
from reconq.recon.shotsim import shot_arrays  # noqa: E402


def scenario(shape, ncoil, nshot, seed=0, snr_db=None):
    rng = np.random.default_rng(seed)
    nd = len(shape)
    npar = motion.nparams(nd)
    theta = np.concatenate([rng.uniform(-4, 4, (nshot, nd)), rng.uniform(-5, 5, (nshot, npar - nd))], 1)
    theta[0] = 0
    ph = Phantom.default(nd, ncoil).resized(0.7 if nd == 2 else 0.6).blurred(1.5, shape)
    ksp, maps, shots, truth = shot_arrays(ph, shape, theta, motion.rotation_matrix, rng, snr_db=snr_db)
    return ksp, maps, shots, theta, truth


def run_case(name, shape, ncoil, nshot, snr_db, devices):
    t0 = time.perf_counter()
    ksp, maps, shots, theta, truth = scenario(shape, ncoil, nshot, snr_db=snr_db)
    print(f"{name}: {shape}, {ncoil} coils, {nshot} shots; data simulated in {time.perf_counter() - t0:.1f} s",
          flush=True)
    nd = len(shape)
    options = alignsense.AlignOptions(reference=0)
    for dev in devices:
        xp = np if dev == "cpu" else __import__("cupy")
        k, m = xp.asarray(ksp), xp.asarray(maps)
        t0 = time.perf_counter()
        plain = alignsense.sense(k, m, shots.any(0))
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = alignsense.align_sense(k, m, shots, options)
        if xp is not np:
            xp.cuda.Device().synchronize()
        t_align = time.perf_counter() - t0
        img = res.image if xp is np else xp.asnumpy(res.image)
        plain = plain if xp is np else xp.asnumpy(plain)
        nrmse = float(np.linalg.norm(img - truth) / np.linalg.norm(truth))
        nr_plain = float(np.linalg.norm(plain - truth) / np.linalg.norm(truth))
        t_err = float(np.abs(res.motion[:, :nd] - theta[:, :nd]).max())
        r_err = float(np.abs(res.motion[:, nd:] - theta[:, nd:]).max())
        est = alignsense.expected_seconds(shape, ncoil, nshot, options)
        print(f"| {name} | {dev} | {t_align:.1f} s | {res.level_iterations} | {res.converged} | {t_err:.4f} | "
              f"{r_err:.4f} | {nrmse:.4f} | {nr_plain:.3f} ({t_plain:.1f} s) | {est:.0f} s | "
              f"{alignsense.memory_bytes(shape, ncoil, nshot) / 2**30:.2f} GiB |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="3D 48 x 48 x 40, 8 coils, 8 shots")
    ap.add_argument("--only", choices=("2d", "3d"))
    ap.add_argument("--snr", type=float, default=None)
    args = ap.parse_args()
    devices = ["cpu"]
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            devices.append("gpu")
    except Exception:  # noqa: BLE001 - no cupy or no device: CPU only
        pass
    print(f"machine: {machine()}; devices: {', '.join(devices)}")
    print("| case | device | time | iterations per level | converged | translation error (voxel) | "
          "rotation error (deg) | NRMSE | uncorrected SENSE NRMSE | expected_seconds | memory_bytes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    if args.only in (None, "2d"):
        run_case("2D 256²", (256, 256), 16, 8, args.snr, devices)
    if args.only in (None, "3d"):
        if args.small:
            run_case("3D 48×48×40", (40, 48, 48), 8, 8, args.snr, devices)
        else:
            run_case("3D 128×128×96", (96, 128, 128), 16, 16, args.snr, devices)


if __name__ == "__main__":
    main()
