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
