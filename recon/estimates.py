"""Resource models of the recon solvers, for the pipelines' estimates.

Pure arithmetic, with no numerical library: the processes that only queue jobs (gateway, API) call the
pipelines' ``memory_estimate`` and must not load the recon's numerical stack to do it; the solvers
import the same functions, so there is one model of each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Working memory of one chunk of shots in flight in :func:`reconq.recon.alignsense.align_sense` (bytes).
ALIGN_CHUNK_BYTES = 512 << 20


def alignsense_memory_bytes(shape: Sequence[int], ncoil: int, nshot: int) -> int:
    """Peak working memory of :func:`reconq.recon.alignsense.align_sense`, bytes (complex64 arrays, the full
    level).

    Counted: the input k-space and maps, the data gathered per shot (as large as the k-space), the
    per-shot back-projections (``nshot`` images), the derivative images and back-projected residuals of
    the joint step (``nshot (nparams + 1)`` images), about ten images of CG and motion work, and one
    chunk of shots in flight (four coil stacks per shot, chunks of at most :data:`ALIGN_CHUNK_BYTES`).
    """
    n = math.prod(int(s) for s in shape)
    image, stack = 8 * n, 8 * n * int(ncoil)
    chunk = min(int(nshot), max(1, ALIGN_CHUNK_BYTES // (4 * stack)))
    npar = 3 if len(shape) == 2 else 6
    return int(3 * stack + (nshot * (npar + 2) + 10 + npar) * image + chunk * (4 + npar / max(nshot, 1)) * stack)


def alignsense_seconds(shape: Sequence[int], ncoil: int, nshot: int, cg_iterations: int = 3,
                       levels: Sequence[float] = (0.25, 0.5, 1.0), max_iterations: int = 300,
                       coarse_iterations: int = 40) -> float:
    """Rough wall time of :func:`reconq.recon.alignsense.align_sense` on the host, seconds.

    Basis: one outer iteration costs about ``2 (cg_iterations + 1) + nparams + 2`` coil-stack FFT pairs
    per shot, ``ncoil * nshot`` FFTs of the level's grid each, at about 0.5 ns per complex point per
    ``log2`` of the size (all the work, not only the FFTs, measured on 2 vCPU AMD EPYC with the DISORDER
    thresholds: 2D 256^2, 16 coils, 8 shots and 3D 40 x 48 x 48, 8 coils, 8 shots); each coarse level is
    taken to run 30 iterations (at most ``coarse_iterations``), the last level 10.
    """
    npar = 3 if len(shape) == 2 else 6
    ffts_per_iteration = (2 * (cg_iterations + 1) + npar + 2) * 2 * int(ncoil) * int(nshot)
    seconds = 0.0
    remaining = max_iterations
    for i, f in enumerate(levels):
        n = float(math.prod(max(4, round(s * f)) for s in shape))
        last = i == len(levels) - 1
        iters = min(10 if last else min(30, coarse_iterations), remaining)
        remaining -= iters
        seconds += iters * ffts_per_iteration * 0.5e-9 * n * max(1.0, math.log2(n))
    return seconds
