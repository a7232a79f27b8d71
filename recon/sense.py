"""SENSE: the encoding operator, its solvers, and the volume driver.

Cartesian SENSE separates along the readout: after the inverse FFT along x (done once, with the
readout oversampling cropped), each readout column is an independent 2D problem over
``(nz, ny)`` (``nz = 1`` for 2D scans). The solvers take a batch of such columns at once:

    y = A x = M F_yz (S x),   A^H y = sum_c conj(S_c) F_yz^H (M y_c)

with ``x`` ``(B, nz, ny)``, ``S`` ``(B, ncoil, nz, ny)``, ``M`` the ``(nz, ny)`` sampling mask and
``F_yz`` the centered unitary 2D FFT.

* :func:`unfold` solves regular (lattice) undersampling directly, voxel group by voxel group:
  ``x = (E^H E + lamda I)^-1 E^H a`` with ``E`` the ``(ncoil, Ry Rz)`` aliasing matrix.
* :func:`cg_sense` solves any sampling by conjugate gradients on
  ``(A^H A + lamda I) x = A^H y``, each column of the batch with its own step sizes.

References:
    Pruessmann KP, Weiger M, Scheidegger MB, Boesiger P. SENSE: sensitivity encoding for fast MRI.
    Magn Reson Med 1999;42:952-962.
    Pruessmann KP, Weiger M, Boernert P, Boesiger P. Advances in sensitivity encoding with
    arbitrary k-space trajectories. Magn Reson Med 2001;46:638-651.
    Hestenes MR, Stiefel E. Methods of conjugate gradients for solving linear systems.
    J Res Natl Bur Stand 1952;49:409-436.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import sigpy as sp

from reconq.recon import fft
from reconq.recon.errors import ReconError

logger = logging.getLogger(__name__)

_AXES = (-2, -1)


class Linop:
    """A linear operator with its adjoint: ``A(x)``, ``A.H(y)``."""

    def __init__(self, forward: Callable, adjoint: Callable, name: str = "A"):
        self._forward, self._adjoint, self.name = forward, adjoint, name

    def __call__(self, x):
        return self._forward(x)

    @property
    def H(self) -> Linop:  # noqa: N802 - the paper's name
        return Linop(self._adjoint, self._forward, self.name + ".H")


def sense_op(mps, mask) -> Linop:
    """The SENSE encoding ``A = M F (S .)`` for a batch of 2D problems.

    Args:
        mps: ``(B, ncoil, nz, ny)`` complex64 coil maps, numpy or cupy.
        mask: ``(nz, ny)`` sampling mask (bool or 0/1), broadcast over the batch and coils.

    Returns:
        ``A``: ``(B, nz, ny)`` -> ``(B, ncoil, nz, ny)``, and ``A.H`` back.
    """
    xp = sp.get_array_module(mps)
    m = xp.asarray(mask).astype(mps.real.dtype)

    def forward(x):
        return m * fft.fft(mps * x[:, None], axes=_AXES)

    def adjoint(y):
        return xp.sum(xp.conj(mps) * fft.ifft(m * y, axes=_AXES), axis=1)

    return Linop(forward, adjoint, "SENSE")


def _bdot(a, b):
    """Per-batch real inner product ``Re <a, b>`` over all but the first axis: ``(B, 1, 1)``."""
    xp = sp.get_array_module(a)
    return xp.real(xp.sum(xp.conj(a) * b, axis=tuple(range(1, a.ndim)), keepdims=True))


def conjugate_gradient(normal: Callable, b, niter: int = 20, tol: float = 1e-6):
    """Solve ``normal(x) = b`` for a batch of Hermitian positive definite systems.

    Args:
        normal: the operator, ``(B, ...)`` -> ``(B, ...)``, block diagonal over the batch.
        b: ``(B, ...)`` right-hand sides.
        niter: at most this many iterations.
        tol: stop when every system's residual norm fell below ``tol`` times its initial one.

    Returns:
        ``(B, ...)`` the solutions, same dtype as ``b``.
    """
    xp = sp.get_array_module(b)
    x = xp.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = _bdot(r, r)
    rr0 = xp.maximum(rr, 1e-30)
    for it in range(niter):
        ap = normal(p)
        pap = _bdot(p, ap)
        alpha = xp.where(pap > 0, rr / xp.where(pap > 0, pap, 1), 0).astype(b.real.dtype)
        x += alpha * p
        r -= alpha * ap
        rr_new = _bdot(r, r)
        if float(xp.max(rr_new / rr0)) < tol**2:
            logger.debug("CG converged after %d iterations", it + 1)
            break
        beta = xp.where(rr > 0, rr_new / xp.where(rr > 0, rr, 1), 0).astype(b.real.dtype)
        p = r + beta * p
        rr = rr_new
    return x


def cg_sense(ksp, mps, mask, lamda: float = 1e-3, niter: int = 20, tol: float = 1e-6):
    """CG-SENSE for any Cartesian sampling of a batch of 2D problems.

    Args:
        ksp: ``(B, ncoil, nz, ny)`` complex64 k-space (zero where not sampled), pre-whitened.
        mps: ``(B, ncoil, nz, ny)`` complex64 coil maps.
        mask: ``(nz, ny)`` sampling mask.
        lamda: Tikhonov weight relative to the largest ``sum_c |S_c|^2``.
        niter, tol: see :func:`conjugate_gradient`.

    Returns:
        ``(B, nz, ny)`` complex64 images.
    """
    xp = sp.get_array_module(ksp)
    a = sense_op(mps, mask)
    weight = lamda * float(xp.max(xp.sum(xp.abs(mps) ** 2, axis=1))) if mps.size else 0.0
    return conjugate_gradient(lambda x: a.H(a(x)) + weight * x, a.H(ksp), niter, tol)


def alias_weights(n: int, r: int, offset: int) -> np.ndarray:
    """Weights of the ``r`` replicas that sampling every ``r``-th line (from ``offset``) folds together.

    With ``a = ifft(M fft(x))`` (centered, unitary) along an axis of ``n`` points,
    ``a[p] = sum_s w[s] x[(p - s n / r) mod n]``. Computed from the operator itself (its response
    to a point), so it holds for any FFT centring.

    Returns:
        ``(r,)`` complex128 weights.
    """
    mask = np.zeros(n)
    mask[offset % r::r] = 1
    point = np.zeros(n, dtype=np.complex128)
    point[0] = 1
    response = fft.ifft(mask * fft.fft(point, axes=(0,)), axes=(0,))
    return np.asarray([response[(s * n // r) % n] for s in range(r)])


def unfold(ksp, mps, accel: tuple[int, int], offsets: tuple[int, int], lamda: float = 1e-3):
    """Direct SENSE unfolding of regular undersampling for a batch of 2D problems.

    Args:
        ksp: ``(B, ncoil, nz, ny)`` complex64 k-space sampled on the lattice
            ``e2 = offsets[1] (mod Rz)``, ``e1 = offsets[0] (mod Ry)`` (other lines are ignored).
        mps: ``(B, ncoil, nz, ny)`` complex64 coil maps.
        accel: ``(Ry, Rz)``; ``ny`` and ``nz`` must be multiples.
        offsets: ``(ky, kz)`` offsets of the lattice.
        lamda: Tikhonov weight relative to the largest ``sum_c |S_c|^2``.

    Returns:
        ``(B, nz, ny)`` complex64 images.
    """
    xp = sp.get_array_module(ksp)
    nb, ncoil, nz, ny = ksp.shape
    ry, rz = accel
    if ny % ry or nz % rz:
        raise ReconError(f"matrix (nz, ny) = {(nz, ny)} is not a multiple of the acceleration {(rz, ry)}")
    mz, my = nz // rz, ny // ry
    comb = np.zeros((nz, ny), dtype=np.float32)
    comb[offsets[1] % rz::rz, offsets[0] % ry::ry] = 1
    folded = fft.ifft(ksp * xp.asarray(comb), axes=_AXES)[:, :, :mz, :my]  # (B, ncoil, mz, my)
    w = np.outer(alias_weights(nz, rz, offsets[1]), alias_weights(ny, ry, offsets[0]))  # (rz, ry)
    iz = (np.arange(mz)[None, :] - np.arange(rz)[:, None] * mz) % nz  # (rz, mz)
    iy = (np.arange(my)[None, :] - np.arange(ry)[:, None] * my) % ny  # (ry, my)
    zz, yy = xp.asarray(iz[:, None, :, None]), xp.asarray(iy[None, :, None, :])
    e = mps[:, :, zz, yy] * xp.asarray(w[:, :, None, None].astype(np.complex64))  # (B, ncoil, rz, ry, mz, my)
    e = e.reshape(nb, ncoil, rz * ry, mz, my).transpose(0, 3, 4, 1, 2)  # (B, mz, my, ncoil, R)
    a = folded.transpose(0, 2, 3, 1)  # (B, mz, my, ncoil)
    ehe = xp.einsum("...cr,...cs->...rs", xp.conj(e), e)
    weight = lamda * float(xp.max(xp.sum(xp.abs(mps) ** 2, axis=1))) * float(np.mean(np.abs(w) ** 2))
    ehe += weight * xp.eye(rz * ry, dtype=ehe.dtype)
    eha = xp.einsum("...cr,...c->...r", xp.conj(e), a)
    x = xp.linalg.solve(ehe, eha[..., None])[..., 0]  # (B, mz, my, R)
    out = xp.zeros((nb, nz, ny), dtype=ksp.dtype)
    out[:, zz, yy] = x.reshape(nb, mz, my, rz, ry).transpose(0, 3, 4, 1, 2)
    return out


def lattice(sampled: np.ndarray, accel: tuple[int, int]) -> tuple[int, int] | None:
    """The lattice offsets ``(ky, kz)`` of a regular sampling, or None when it is not regular.

    Args:
        sampled: ``(nz, ny)`` bool, the lines with data.
        accel: ``(Ry, Rz)``.

    Regular: every lattice line between the first and last sampled line (per axis) is sampled
    (partial Fourier leaves lines out at one edge only). Lines off the lattice are allowed (they
    are not used by :func:`unfold`).
    """
    ry, rz = accel
    nz, ny = sampled.shape
    best = None
    for oz in range(rz):
        for oy in range(ry):
            lat = np.zeros_like(sampled)
            lat[oz::rz, oy::ry] = True
            hits = int((sampled & lat).sum())
            if best is None or hits > best[0]:
                best = (hits, oy, oz, lat)
    assert best is not None
    _, oy, oz, lat = best
    rows, cols = np.flatnonzero(sampled.any(axis=1)), np.flatnonzero(sampled.any(axis=0))
    box = np.zeros_like(sampled)
    box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    return (oy, oz) if np.all(sampled[lat & box]) else None


def sense_columns(hybrid, maps_batch: Callable, sampled: np.ndarray, accel: tuple[int, int],
                  method: str = "auto", lamda: float = 1e-3, niter: int = 20, batch: int = 32):
    """Solve SENSE for every readout column of a hybrid-space volume, ``batch`` columns at a time.

    Args:
        hybrid: ``(ncoil, nz, ny, nx)`` complex64: k-space in z and y, image in x (pre-whitened).
        maps_batch: ``maps_batch(x_index (B,))`` -> ``(ncoil, nz, ny, B)`` coil maps of those columns.
        sampled: ``(nz, ny)`` bool, the lines with data.
        accel: ``(Ry, Rz)``.
        method: ``"unfold"``, ``"cg"``, or ``"auto"`` (unfold when the sampling is a regular lattice).
        lamda, niter: regularisation and CG iterations.
        batch: readout columns per solve (memory: about ``12 * ncoil * nz * ny * batch * 8`` bytes).

    Returns:
        ``(nz, ny, nx)`` complex64 image.
    """
    xp = sp.get_array_module(hybrid)
    ncoil, nz, ny, nx = hybrid.shape
    offsets = lattice(sampled, accel)
    if method == "auto":
        method = "unfold" if offsets is not None and ny % accel[0] == 0 and nz % accel[1] == 0 else "cg"
    if method == "unfold" and offsets is None:
        raise ReconError("method 'unfold' needs a regular sampling lattice; use 'cg'")
    if method not in ("unfold", "cg"):
        raise ReconError(f"SENSE method {method!r}: must be 'auto', 'unfold' or 'cg'")
    logger.debug("SENSE %s: (nz, ny, nx) = %s, R = %s, %d coils", method, (nz, ny, nx), accel, ncoil)
    out = xp.zeros((nz, ny, nx), dtype=hybrid.dtype)
    mask = xp.asarray(sampled)
    for start in range(0, nx, batch):
        xs = np.arange(start, min(start + batch, nx))
        y = xp.ascontiguousarray(hybrid[..., start:xs[-1] + 1].transpose(3, 0, 1, 2))
        mps = xp.ascontiguousarray(xp.asarray(maps_batch(xs)).transpose(3, 0, 1, 2))
        x = unfold(y, mps, accel, offsets, lamda) if offsets is not None and method == "unfold" \
            else cg_sense(y * mask, mps, mask, lamda, niter)
        out[..., start:xs[-1] + 1] = x.transpose(1, 2, 0)
    return out
