"""Motion-corrected SENSE of multi-shot Cartesian scans (aligned SENSE, DISORDER), on arrays.

Model: shot ``s`` samples its phase-encode lines (the readout, the last axis, is fully sampled) of
the object moved rigidly by ``theta_s``, seen by coils fixed in the scanner frame::

    y_s = A_s F S T(theta_s) x

with ``x`` the image (2D ``(ny, nx)`` or 3D ``(nz, ny, nx)``), ``T`` the unitary sinc rigid transform
of :mod:`reconq.recon.motion` (3 parameters in 2D, 6 in 3D: voxels and degrees), ``S`` the coil maps,
``F`` the centred unitary FFT over the image axes and ``A_s`` the sampling of the shot's lines.

Solver (:func:`align_sense`) minimises ``sum_s ||A_s F S T(theta_s) x - y_s||^2 + lamda ||x||^2``
alternately:

* ``x``: a few preconditioned conjugate-gradient iterations on the normal equations, warm-started,
  preconditioned by ``1 / (rho sum_c |S_c|^2 + lamda)`` (``rho``: the sampled fraction of the lines);
* ``theta``: one Levenberg-Marquardt step per shot (shots are independent given ``x``), or near the
  solution one joint step of ``x`` and ``theta`` (below): the analytic
  Jacobian ``A_s F S dT/dtheta x`` (:func:`reconq.recon.motion.transform_derivatives`), the step
  ``-(H + mu diag H)^-1 g``, accepted only for the shots whose residual falls (``mu`` divided by 3),
  the others keep their motion (``mu`` times 10).

Joint step: the per-shot step holds ``x`` fixed, so motion that the image can follow (a shot and ``x``
moving together) is only corrected through the slow alternation (accelerated data above all: at
R = 2 the alternation stalled at 0.3 voxel). On every level but the first (where ``x`` is still far
from the solution), once every per-shot step is below ``_JOINT_BELOW``, the step is instead the
Gauss-Newton step of ``(x, theta)`` together: ``motion_cg_iterations`` preconditioned CG iterations on::

    [[A^H A + lamda, A^H J], [Re J^H A, H + mu diag H]] [dx; dtheta] = -[A^H r + lamda x; Re J^H r]

(``A`` the encoding with the current motion, ``J`` its motion Jacobian; each CG iteration costs one
application of the normal operator, the derivative images ``dT/dtheta x`` kept), preconditioned by
the ``x`` preconditioner and the per-shot ``(H + mu diag H)^-1``; the step (``dx`` and ``dtheta``
scaled together to the trust region) is accepted if the whole energy falls (``mu`` / 3), else
rejected (``mu`` * 10). This is the variable-projection (Schur complement) step of the motion with
``dx/dtheta`` included, without forming the Schur complement.

Coarse search (local minima of large motion): after the first level, for each shot, the image of
the other shots (the shot left out of a few CG iterations), rotation candidates every 5 degrees within
``search_rotation`` (3D: about one axis at a time), for each the best whole-voxel translation of the
level over the whole periodic grid by one FFT correlation with the shot's back-projected data; the
candidate of the smallest exact residual replaces the shot's motion if it lowers that residual by 2 %.
The level is then run again, and its result kept only if its energy is below that before the jump
(at most ``_SEARCH_ROUNDS`` searches).

Gauge (drift): the energy is (nearly) invariant to one common rigid motion ``g`` of all shots
applied inversely to ``x`` (``T(theta_s) x = T(theta_s g^-1) T(g) x``). After every motion step the
mean motion ``g`` (the mean of the parameters over the shots) is taken out of every shot (exact
composition of the rigid matrices) and applied to ``x``, so the iterates stay in the mean position.
Pinning one shot instead converges far slower: the pinned shot cannot move towards the consensus,
so the other shots must move together, against the weak restoring force of the coil encoding.
Returned, by ``AlignOptions.reference``:

* ``None`` (default): the image in the mean position of the shots, ``motion[s]`` the transform
  taking it to shot ``s``'s position (the parameters average to about zero over the shots);
* a shot index ``r``: re-referenced once at the end, ``x <- T(motion[r]) x`` and
  ``motion[s] <- motion[s] motion[r]^-1``: the image in shot ``r``'s position, ``motion[r] == 0``.

Multi-resolution: level ``f`` of ``AlignOptions.levels`` solves the same problem on the central
``f N`` of k-space along every axis (maps sampled at the coarse voxel centres, data scaled so that
the image keeps its amplitude), so a coarse level sees a smooth energy where motion of 10 degrees
and 10 voxels is within reach; ``x`` is carried to the next level by zero-padding its k-space, the
motion as it is (translations are kept in full-resolution voxels throughout).

Stopping, per level: every shot's accepted update below ``translation_tol`` voxels and
``rotation_tol`` degrees (thresholds of DISORDER; at a coarse level, in that level's voxels and
scaled alike), with no rejected step, or a relative energy change below ``energy_tol``; at most
``coarse_iterations`` outer iterations for a coarse level and ``max_iterations`` in all.

Arrays may be numpy or cupy: every operation goes through ``sigpy.get_array_module``; the motion
and the small per-shot systems stay on the host.

References:
    Cordero-Grande L, Teixeira RPAG, Hughes EJ, Hutter J, Price AN, Hajnal JV. Sensitivity encoding
    for aligned multishot magnetic resonance reconstruction. IEEE Trans Comput Imaging
    2016;2:266-280, doi 10.1109/TCI.2016.2557069.
    Cordero-Grande L, Ferrazzi G, Teixeira RPAG, O'Muircheartaigh J, Price AN, Hajnal JV.
    Motion-corrected MRI with DISORDER: distributed and incoherent sample orders for reconstruction
    deblurring using encoding redundancy. Magn Reson Med 2020;84:713-726, doi 10.1002/mrm.28157.
    Pruessmann KP, Weiger M, Boernert P, Boesiger P. Advances in sensitivity encoding with arbitrary
    k-space trajectories. Magn Reson Med 2001;46:638-651.
    Marquardt DW. An algorithm for least-squares estimation of nonlinear parameters. J Soc Ind Appl
    Math 1963;11:431-441.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft
import sigpy as sp

from reconq.recon import fft, motion
from reconq.recon.errors import ReconError
from reconq.recon.estimates import ALIGN_CHUNK_BYTES, alignsense_memory_bytes, alignsense_seconds

logger = logging.getLogger(__name__)

#: working memory per chunk of shots (coil stacks in flight), bytes
_CHUNK_BYTES = ALIGN_CHUNK_BYTES
#: largest update per outer iteration: translations in the level's voxels, rotations in degrees
_MAX_STEP = 1.0
#: outer iterations on a level before its stopping tests apply (the first steps start from a blurred x)
_MIN_LEVEL_ITERATIONS = 3
#: the joint (x, motion) Gauss-Newton step replaces the per-shot one once every per-shot step is below
#: this (level voxels / degrees): near the solution, where the linearisation holds for x and motion
_JOINT_BELOW = 0.2
#: coarse search (:func:`_search`): degrees between rotation candidates, CG iterations of the
#: leave-one-out reference, searches on the first level, relative residual drop that makes a shot jump
_SEARCH_STEP, _SEARCH_CG, _SEARCH_ROUNDS, _SEARCH_MARGIN = 5.0, 10, 2, 0.02
_SEARCH_FIRST = 0
_DAMP_DOWN, _DAMP_UP, _DAMP_MIN, _DAMP_MAX = 3.0, 10.0, 1e-9, 1e9


@dataclass(frozen=True)
class AlignOptions:
    """Options of :func:`align_sense`.

    Attributes:
        max_iterations: outer iterations (``x`` step, then motion step) over all levels.
        cg_iterations: preconditioned CG iterations on ``x`` per outer iteration.
        motion_cg_iterations: CG iterations of the joint ``(x, theta)`` Gauss-Newton step (0: per-shot
            steps only; see the module docstring).
        lamda: Tikhonov weight, relative to the largest ``sum_c |S_c|^2`` (as :func:`reconq.recon.sense.cg_sense`).
        damping: initial Levenberg-Marquardt damping ``mu`` (relative to the Hessian's diagonal).
        levels: k-space fractions of the resolution pyramid, increasing, ending in 1.
        coarse_iterations: at most this many outer iterations on each level but the last.
        translation_tol: convergence threshold on each shot's translation update, voxels.
        rotation_tol: convergence threshold on each shot's rotation update, degrees.
        energy_tol: convergence threshold on the relative change of the energy in one iteration.
        search_rotation: span of the coarse search on the first level, degrees either side of each
            shot's rotation (0: no search; see the module docstring).
        reference: None, the image in the mean position of the shots; or a shot index: the image in
            that shot's position, whose motion is then zero (see the module docstring).
    """

    max_iterations: int = 300
    cg_iterations: int = 3
    motion_cg_iterations: int = 10
    lamda: float = 1e-4
    damping: float = 1e-3
    levels: tuple[float, ...] = (0.25, 0.5, 1.0)
    coarse_iterations: int = 40
    translation_tol: float = 0.05
    rotation_tol: float = 0.02
    energy_tol: float = 1e-7
    search_rotation: float = 20.0
    reference: int | None = None

    def validate(self) -> AlignOptions:
        """Raise :class:`ReconError` naming the first bad option; return ``self``."""
        value = self.motion_cg_iterations
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ReconError(f"AlignOptions.motion_cg_iterations must be an integer >= 0, got {value!r}")
        for name in ("max_iterations", "cg_iterations", "coarse_iterations"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ReconError(f"AlignOptions.{name} must be a positive integer, got {value!r}")
        for name in ("lamda", "translation_tol", "rotation_tol", "energy_tol", "search_rotation"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value) and value >= 0):
                raise ReconError(f"AlignOptions.{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.damping, (int, float, np.floating)) and 0 < self.damping < _DAMP_MAX):
            raise ReconError(f"AlignOptions.damping must be in (0, {_DAMP_MAX:g}), got {self.damping!r}")
        levels = tuple(self.levels)
        if (not levels or any(not (isinstance(f, (int, float, np.floating)) and 0 < f <= 1) for f in levels)
                or any(b <= a for a, b in zip(levels, levels[1:], strict=False)) or levels[-1] != 1):
            raise ReconError("AlignOptions.levels must be increasing fractions in (0, 1] ending in 1, "
                             f"got {self.levels!r}")
        if self.reference is not None and (not isinstance(self.reference, (int, np.integer))
                                           or isinstance(self.reference, bool) or self.reference < 0):
            raise ReconError(f"AlignOptions.reference must be a shot index >= 0, got {self.reference!r}")
        return self


@dataclass
class AlignResult:
    """The outcome of :func:`align_sense`.

    Attributes:
        image: ``shape`` complex64, the corrected image, in the mean position of the shots or in the
            reference shot's (same device as the input).
        motion: ``(nshot, 3 | 6)`` float64, per shot ``T(motion[s])`` maps the image to that shot's
            position (voxels of the full grid and degrees; see :mod:`reconq.recon.motion`).
        iterations: outer iterations done, all levels together.
        converged: whether the last level met a stopping criterion before the iteration limit.
        residual: after each outer iteration, the energy divided by the data's energy ``||y||^2``.
        level_iterations: outer iterations done on each level.
    """

    image: object
    motion: np.ndarray
    iterations: int
    converged: bool
    residual: list[float] = field(default_factory=list)
    level_iterations: tuple[int, ...] = ()


# --- checks ------------------------------------------------------------------------------------


def _host(a) -> np.ndarray:
    return np.asarray(sp.to_device(a, sp.cpu_device)) if sp.get_array_module(a) is not np else np.asarray(a)


def _check(ksp, maps, shots) -> np.ndarray:
    if ksp.ndim not in (3, 4):
        raise ReconError(f"k-space must be (ncoil, ny, nx) or (ncoil, nz, ny, nx), got shape {tuple(ksp.shape)}")
    if tuple(maps.shape) != tuple(ksp.shape):
        raise ReconError(f"coil maps {tuple(maps.shape)} do not match the k-space {tuple(ksp.shape)}")
    shots = _host(shots)
    if shots.dtype != bool:
        raise ReconError(f"shots must be a bool array, got {shots.dtype}")
    if shots.ndim != ksp.ndim - 1 or tuple(shots.shape[1:]) != tuple(ksp.shape[1:-1]):
        raise ReconError(f"shots must be (nshot, *{tuple(ksp.shape[1:-1])}) (the phase-encode lines), "
                         f"got shape {shots.shape}")
    empty = np.flatnonzero(~shots.reshape(len(shots), -1).any(axis=1))
    if len(empty):
        raise ReconError(f"shot {int(empty[0])} samples no lines")
    return shots


def correctable(shots) -> tuple[bool, str]:
    """Whether inter-shot motion of this sampling order can be estimated from the data.

    A sequential order (each shot one contiguous block of lines along a phase-encode axis, the blocks
    disjoint) leaves the shot that holds the k-space centre alone with the low frequencies: the shots
    share no redundancy to align them, and the motion cannot be told from the image. Interleaved,
    random and DISORDER (distributed, incoherent) orders spread every shot over k-space.

    Args:
        shots: ``(nshot, *pe_shape)`` bool, the lines of each shot.

    Returns:
        ``(ok, reason)``: the reason says what makes the order correctable or not.
    """
    shots = _host(shots).astype(bool)
    if shots.ndim < 2:
        return False, f"shots must be (nshot, *phase-encode shape), got shape {shots.shape}"
    nshot = shots.shape[0]
    if nshot < 2:
        return False, "a single shot: there is no inter-shot motion to correct"
    if not shots.reshape(nshot, -1).any(axis=1).all():
        return False, "a shot samples no lines"
    for axis in range(1, shots.ndim):
        other = tuple(a for a in range(1, shots.ndim) if a != axis)
        used = shots.any(axis=other) if other else shots  # (nshot, n_axis)
        spans = []
        for s in range(nshot):
            idx = np.flatnonzero(used[s])
            spans.append((idx[0], idx[-1]))
        spans.sort()
        if all(b[0] > a[1] for a, b in zip(spans, spans[1:], strict=False)):
            return False, (f"sequential order: each of the {nshot} shots is one block of k-space along phase-encode "
                           f"axis {axis - 1}, so the shots share no low frequencies to be aligned on")
    return True, f"{nshot} shots spread over k-space (interleaved or distributed)"


# --- the encoding on one level -----------------------------------------------------------------


class _Level:
    """The problem on one pyramid level: data, maps and shots on the level's grid."""

    def __init__(self, ksp, maps, shots: np.ndarray, fraction: float, lamda: float):
        xp = sp.get_array_module(ksp)
        self.xp = xp
        full = tuple(ksp.shape[1:])
        self.ndim = len(full)
        self.axes = tuple(range(-self.ndim, 0))
        shape = full if fraction >= 1 else tuple(max(4, min(n, int(round(n * fraction)))) for n in full)
        self.full, self.shape = full, shape
        self.scale_t = np.array([s / n for s, n in zip(shape, full, strict=True)])  # level voxels per full voxel
        if shape == full:
            y, s, sh = ksp, maps, shots
        else:
            crop = tuple(slice(n // 2 - m // 2, n // 2 - m // 2 + m) for n, m in zip(full, shape, strict=True))
            y = ksp[(slice(None),) + crop] * np.float32(math.sqrt(np.prod(shape) / np.prod(full)))
            idx = [np.clip(np.round(n // 2 + (np.arange(m) - m // 2) * (n / m)).astype(int), 0, n - 1)
                   for n, m in zip(full, shape, strict=True)]
            s = maps[(slice(None),) + tuple(np.ix_(*[xp.asarray(i) for i in idx]))]
            sh = shots[(slice(None),) + crop[:-1]]
        self.maps = xp.ascontiguousarray(s).astype(np.complex64, copy=False)
        # the centred FFT as a plain one: F_c v = P_k F P_x^-1 v with P the fftshifts. Maps and images
        # are shifted once per image (P_x^-1 (S v) = (P_x^-1 S)(P_x^-1 v)) and k-space is kept
        # unshifted (line indices permuted): no shifts of coil stacks.
        self.maps_u = xp.fft.ifftshift(self.maps, axes=self.axes)
        self.nshot = sh.shape[0]
        self.shots = sh
        pe = int(np.prod(shape[:-1]))
        sh_u = np.fft.ifftshift(sh, axes=tuple(range(1, len(shape))))
        lines = [np.flatnonzero(sh_u[i].ravel()) for i in range(self.nshot)]
        self.nlines = np.array([len(v) for v in lines])
        lmax = max(1, int(self.nlines.max()))
        index = np.zeros((self.nshot, lmax), dtype=np.int64)
        weight = np.zeros((self.nshot, lmax), dtype=np.float32)
        for i, v in enumerate(lines):
            index[i, :len(v)] = v
            weight[i, :len(v)] = 1
        self.index, self.weight = xp.asarray(index), xp.asarray(weight)
        self.mask = xp.asarray(sh_u.reshape(self.nshot, 1, pe, 1).astype(np.float32))  # (nshot, 1, pe, 1)
        self.pe = pe
        self.ncoil = self.maps.shape[0]
        y = xp.fft.ifftshift(xp.asarray(y).astype(np.complex64, copy=False), axes=self.axes)
        self.data = self._gather(y[None].reshape(1, self.ncoil, pe, shape[-1]), slice(None))  # (nshot, c, L, nx)
        self.data_energy = float(xp.sum(xp.abs(self.data) ** 2))
        rss = xp.sum(xp.abs(self.maps) ** 2, axis=0)
        self.lamda = lamda * float(xp.max(rss)) if rss.size else 0.0
        rho = float(sh.any(axis=0).mean())
        self.precond = (1.0 / (rho * rss + max(self.lamda, 1e-6 * float(xp.max(rss)) * rho))).astype(np.float32)
        # the data's back-projection per shot, S^H F^H A_s y_s (independent of the motion)
        self.chunk = max(1, min(self.nshot, _CHUNK_BYTES // (4 * 8 * self.ncoil * int(np.prod(shape)))))
        self.backproj = xp.zeros((self.nshot, *shape), dtype=np.complex64)
        for sel in self._chunks():
            k = xp.zeros((len(range(*sel.indices(self.nshot))), self.ncoil, pe, shape[-1]), dtype=np.complex64)
            self._scatter(k, self.data[sel], sel)
            self.backproj[sel] = self._coil_adjoint(k.reshape(k.shape[0], self.ncoil, *shape))

    def _chunks(self):
        for start in range(0, self.nshot, self.chunk):
            yield slice(start, min(start + self.chunk, self.nshot))

    def _gather(self, k, sel):
        """Lines of the shots ``sel`` from ``k (B | 1, c, pe, nx)``: ``(B, c, L, nx)``, zero-padded."""
        xp = self.xp
        idx = self.index[sel][:, None, :, None]
        if k.shape[0] == 1 and idx.shape[0] > 1:
            k = xp.broadcast_to(k, (idx.shape[0],) + k.shape[1:])
        out = xp.take_along_axis(k, xp.broadcast_to(idx, (k.shape[0], k.shape[1], idx.shape[2], k.shape[3])), axis=2)
        return out * self.weight[sel][:, None, :, None]

    def _scatter(self, k, lines, sel):
        """Put ``lines (B, c, L, nx)`` of shots ``sel`` into ``k (B, c, pe, nx)`` (zeros elsewhere)."""
        for b, s in enumerate(range(*sel.indices(self.nshot))):
            n = int(self.nlines[s])
            k[b][:, self.index[s, :n], :] = lines[b, :, :n, :]
        return k

    def coil_kspace(self, images):
        """``F S images`` (k-space unshifted): ``(B, *shape)`` -> ``(B, c, pe, nx)``."""
        v = self.xp.fft.ifftshift(images, axes=self.axes)
        k = _fftn(self.maps_u[None] * v[:, None], self.axes, inverse=False)
        return k.reshape(images.shape[0], self.ncoil, self.pe, self.shape[-1])

    def _coil_adjoint(self, k):
        """``S^H F^H k`` (k-space unshifted): ``(B, c, *shape)`` -> ``(B, *shape)``."""
        u = self.xp.sum(self.xp.conj(self.maps_u)[None] * _fftn(k, self.axes, inverse=True), axis=1)
        return self.xp.fft.fftshift(u, axes=self.axes)

    def level_params(self, theta: np.ndarray) -> np.ndarray:
        p = theta.copy()
        p[:, :self.ndim] *= self.scale_t
        return p

    def _weighted(self, u, weight, sel):
        """``u (B, *shape)`` times the shots' weights (None: all 1)."""
        if weight is None:
            return u
        w = self.xp.asarray(np.asarray(weight[sel], dtype=np.float32)).reshape((-1,) + (1,) * self.ndim)
        return u * w

    def normal(self, x, theta_l: np.ndarray, weight=None):
        """``sum_s w_s T_s^H S^H F^H A_s F S T_s x + lamda x`` (``weight``: ``w_s``, None: 1)."""
        out = self.lamda * x
        for sel in self._chunks():
            v = motion.transform(x[None], theta_l[sel])
            k = self.coil_kspace(v) * self.mask[sel]
            u = self._coil_adjoint(k.reshape(k.shape[0], self.ncoil, *self.shape))
            out = out + self.xp.sum(self._weighted(motion.transform_adjoint(u, theta_l[sel]), weight, sel), axis=0)
        return out

    def rhs(self, theta_l: np.ndarray, weight=None):
        out = self.xp.zeros(self.shape, dtype=np.complex64)
        for sel in self._chunks():
            u = motion.transform_adjoint(self.backproj[sel], theta_l[sel])
            out = out + self.xp.sum(self._weighted(u, weight, sel), axis=0)
        return out

    def residual_energy(self, x, theta_l: np.ndarray) -> np.ndarray:
        """``||A_s F S T_s x - y_s||^2`` per shot, ``(nshot,)`` float64 on the host."""
        out = np.zeros(self.nshot)
        for sel in self._chunks():
            r = self._gather(self.coil_kspace(motion.transform(x[None], theta_l[sel])), sel) - self.data[sel]
            out[sel] = _host(self.xp.sum(self.xp.abs(r) ** 2, axis=(1, 2, 3)))
        return out

    def gauss_newton(self, x, theta_l: np.ndarray):
        """Per shot ``H = Re J^H J``, ``g = Re J^H r`` and ``||r||^2`` (host arrays)."""
        xp = self.xp
        npar = theta_l.shape[1]
        hess, grad, energy = np.zeros((self.nshot, npar, npar)), np.zeros((self.nshot, npar)), np.zeros(self.nshot)
        for sel in self._chunks():
            tx, d = motion.transform_derivatives(x[None], theta_l[sel])  # (B, *shape), (B, npar, *shape)
            r = self._gather(self.coil_kspace(tx), sel) - self.data[sel]
            jac = xp.stack([self._gather(self.coil_kspace(d[:, j]), sel) for j in range(npar)], axis=1)
            b = jac.shape[0]
            jac = jac.reshape(b, npar, -1)
            r = r.reshape(b, 1, -1)
            hess[sel] = _host(xp.real(xp.matmul(xp.conj(jac), jac.transpose(0, 2, 1))))
            grad[sel] = _host(xp.real(xp.sum(xp.conj(jac) * r, axis=2)))
            energy[sel] = _host(xp.sum(xp.abs(r) ** 2, axis=(1, 2)))
        return hess, grad, energy

    def linearise(self, x, theta_l: np.ndarray):
        """The motion model linearised at ``(x, theta)``.

        Returns ``(d, w, hess, grad, energy)``: ``d (nshot, npar, *shape)`` the derivative images
        ``dT_s/dtheta x``, ``w (nshot, *shape)`` the back-projected residuals ``S^H F^H A_s^H r_s``,
        per shot ``H = Re J^H J`` and ``g = Re J^H r`` (host) and ``||r_s||^2`` (host).
        """
        xp = self.xp
        npar = theta_l.shape[1]
        d = xp.zeros((self.nshot, npar, *self.shape), dtype=np.complex64)
        w = xp.zeros((self.nshot, *self.shape), dtype=np.complex64)
        hess, grad, energy = np.zeros((self.nshot, npar, npar)), np.zeros((self.nshot, npar)), np.zeros(self.nshot)
        for sel in self._chunks():
            tx, dd = motion.transform_derivatives(x[None], theta_l[sel])
            d[sel] = dd
            k = self.coil_kspace(tx)
            r = self._gather(k, sel) - self.data[sel]
            b = r.shape[0]
            energy[sel] = _host(xp.sum(xp.abs(r) ** 2, axis=(1, 2, 3)))
            w[sel] = self._coil_adjoint((k * self.mask[sel]).reshape(b, self.ncoil, *self.shape)) - self.backproj[sel]
            jac = xp.stack([self._gather(self.coil_kspace(dd[:, j]), sel) for j in range(npar)], axis=1)
            jac = jac.reshape(b, npar, -1)
            hess[sel] = _host(xp.real(xp.matmul(xp.conj(jac), jac.transpose(0, 2, 1))))
            grad[sel] = _host(xp.real(xp.sum(xp.conj(jac) * r.reshape(b, 1, -1), axis=2)))
        return d, w, hess, grad, energy

    def joint_apply(self, u, v: np.ndarray, theta_l: np.ndarray, d, damp: np.ndarray):
        """The Gauss-Newton normal operator of ``(x, theta)`` applied to ``(u, v)``.

        ``damp (nshot, npar)``: the Levenberg-Marquardt diagonal added to the motion block."""
        xp = self.xp
        out_u = self.lamda * u
        out_v = damp * v
        axes = tuple(range(2, 2 + self.ndim))
        for sel in self._chunks():
            vv = xp.asarray(v[sel].astype(np.float32)).reshape(v[sel].shape + (1,) * self.ndim)
            z = motion.transform(u[None], theta_l[sel]) + xp.sum(d[sel] * vv, axis=1)
            k = self.coil_kspace(z) * self.mask[sel]
            wk = self._coil_adjoint(k.reshape(k.shape[0], self.ncoil, *self.shape))
            out_u = out_u + xp.sum(motion.transform_adjoint(wk, theta_l[sel]), axis=0)
            out_v[sel] = out_v[sel] + _host(xp.real(xp.sum(xp.conj(d[sel]) * wk[:, None], axis=axes)))
        return out_u, out_v

    def joint_step(self, x, theta_l: np.ndarray, lin, mu: np.ndarray, niter: int):
        """Joint Gauss-Newton step ``(dx, dtheta)`` by ``niter`` preconditioned CG iterations on the
        linearised problem (the motion block damped by ``mu diag H``), from zero."""
        xp = self.xp
        d, w, hess, grad, _ = lin
        diag = np.maximum(np.einsum("sii->si", hess), 1e-30)
        damp = mu[:, None] * diag
        blocks = np.linalg.inv(hess + damp[:, :, None] * np.eye(hess.shape[1])[None])

        def precondition(ru, rv):
            return self.precond * ru, np.einsum("sij,sj->si", blocks, rv)

        ru = -(self.lamda * x)
        for sel in self._chunks():
            ru = ru - xp.sum(motion.transform_adjoint(w[sel], theta_l[sel]), axis=0)
        rv = -grad
        u, v = xp.zeros_like(x), np.zeros_like(grad)
        zu, zv = precondition(ru, rv)
        pu, pv = zu.copy(), zv.copy()
        rz = float(xp.real(xp.vdot(ru, zu))) + float(np.sum(rv * zv))
        for _ in range(niter):
            if rz <= 0:
                break
            qu, qv = self.joint_apply(pu, pv, theta_l, d, damp)
            pq = float(xp.real(xp.vdot(pu, qu))) + float(np.sum(pv * qv))
            if pq <= 0:
                break
            alpha = rz / pq
            u = u + np.float32(alpha) * pu
            v = v + alpha * pv
            ru = ru - np.float32(alpha) * qu
            rv = rv - alpha * qv
            zu, zv = precondition(ru, rv)
            rz_new = float(xp.real(xp.vdot(ru, zu))) + float(np.sum(rv * zv))
            beta = rz_new / rz
            pu = zu + np.float32(beta) * pu
            pv = zv + beta * pv
            rz = rz_new
        return u, v

    def shot_residuals(self, x, s: int, params: np.ndarray) -> np.ndarray:
        """``||A_s F S T(p) x - y_s||^2`` of shot ``s`` for each row ``p`` of ``params (K, npar)`` (level units)."""
        xp = self.xp
        n = int(self.nlines[s])
        idx = self.index[s, :n]
        out = np.zeros(len(params))
        for start in range(0, len(params), self.chunk):
            p = params[start:start + self.chunk]
            k = self.coil_kspace(motion.transform(x[None], p))  # (K, c, pe, nx)
            r = k[:, :, idx, :] - self.data[s][None, :, :n, :]
            out[start:start + len(p)] = _host(xp.sum(xp.abs(r) ** 2, axis=(1, 2, 3)))
        return out

    def best_translations(self, x, s: int, rotations: np.ndarray) -> np.ndarray:
        """For each row of ``rotations (K, nrot)`` (degrees), the whole-voxel translation of this level
        that best matches the rotated ``x`` to shot ``s``'s back-projected data: the peak over the
        periodic grid of ``Re <T_t R x, S^H F^H A_s^H y_s>`` (one FFT correlation per rotation). Returns
        ``(K, npar)`` level parameters."""
        xp = self.xp
        npar = self.ndim + rotations.shape[1]
        out = np.zeros((len(rotations), npar))
        out[:, self.ndim:] = rotations
        spec_b = _fftn(self.backproj[s], self.axes, inverse=False)
        for start in range(0, len(rotations), self.chunk):
            p = out[start:start + self.chunk]
            u = motion.transform(x[None], p)
            corr = xp.real(_fftn(xp.conj(_fftn(u, self.axes, inverse=False)) * spec_b[None], self.axes, inverse=True))
            flat = _host(xp.argmax(corr.reshape(len(p), -1), axis=1))
            for i, f in enumerate(flat):
                t = np.array(np.unravel_index(int(f), self.shape), dtype=np.float64)
                n = np.array(self.shape)
                out[start + i, :self.ndim] = np.where(t > n // 2, t - n, t)
        return out

    def pcg(self, x, theta_l: np.ndarray, niter: int, weight=None, tol: float = 0.0):
        """Warm-started preconditioned CG on ``x`` (``weight``: per-shot weights of the data, None: 1),
        stopping early once the preconditioned residual is below ``tol`` times its first value."""
        xp = self.xp
        r = self.rhs(theta_l, weight) - self.normal(x, theta_l, weight)
        z = self.precond * r
        p = z.copy()
        rz = rz0 = float(xp.real(xp.vdot(r, z)))
        for _ in range(niter):
            if rz <= 0 or rz <= tol**2 * rz0:
                break
            ap = self.normal(p, theta_l, weight)
            pap = float(xp.real(xp.vdot(p, ap)))
            if pap <= 0:
                break
            alpha = np.float32(rz / pap)
            x = x + alpha * p
            r = r - alpha * ap
            z = self.precond * r
            rz_new = float(xp.real(xp.vdot(r, z)))
            p = z + np.float32(rz_new / rz) * p
            rz = rz_new
        return x

    def upsample_from(self, x, other: _Level):
        """``x`` of level ``other`` on this level's grid (zero-padded k-space, same amplitude)."""
        if other.shape == self.shape:
            return x
        xp = self.xp
        k = fft.fft(x, axes=self.axes)
        big = xp.zeros(self.shape, dtype=np.complex64)
        place = tuple(slice(n // 2 - m // 2, n // 2 - m // 2 + m)
                      for n, m in zip(self.shape, other.shape, strict=True))
        big[place] = k
        return (fft.ifft(big, axes=self.axes) * np.float32(math.sqrt(np.prod(self.shape) / np.prod(other.shape))))\
            .astype(np.complex64)


# --- the solvers -------------------------------------------------------------------------------


def align_sense(ksp, maps, shots, options: AlignOptions | None = None,
                progress: Callable[[float, str], None] | None = None, initial=None) -> AlignResult:
    """Motion-corrected SENSE: the image and each shot's rigid motion from multi-shot k-space.

    Args:
        ksp: ``(ncoil, *shape)`` complex64 Cartesian k-space on the solve grid, zero where not sampled
            (pre-whitened), numpy or cupy; ``shape`` is ``(ny, nx)`` or ``(nz, ny, nx)``, readout last.
        maps: ``(ncoil, *shape)`` coil maps (scanner frame), same device.
        shots: ``(nshot, *shape[:-1])`` bool: the phase-encode lines of each shot (host or device).
        options: :class:`AlignOptions` (defaults when None).
        progress: called as ``progress(fraction, stage)`` after each outer iteration.
        initial: optional ``(nshot, 3 | 6)`` starting motion (full-grid voxels, degrees).

    Returns:
        :class:`AlignResult` (image in the mean position, or the reference shot's with ``motion[reference] == 0``).

    Raises:
        ReconError: bad shapes or options, an empty shot, or a reference shot out of range.
    """
    options = (options or AlignOptions()).validate()
    shots = _check(ksp, maps, shots)
    xp = sp.get_array_module(ksp)
    maps = xp.asarray(maps)
    nshot, ndim = shots.shape[0], ksp.ndim - 1
    if options.reference is not None and options.reference >= nshot:
        raise ReconError(f"AlignOptions.reference is shot {options.reference}, but there are only {nshot} shots")
    npar = motion.nparams(ndim)
    theta = np.zeros((nshot, npar)) if initial is None else np.array(initial, dtype=np.float64)
    if theta.shape != (nshot, npar):
        raise ReconError(f"initial motion must be ({nshot}, {npar}), got {theta.shape}")
    free = np.ones(nshot, dtype=bool)

    residual: list[float] = []
    level_iterations: list[int] = []
    total, converged = 0, False
    x, previous = None, None
    level: _Level | None = None
    for li, fraction in enumerate(options.levels):
        last = li == len(options.levels) - 1
        level = _Level(ksp, maps, shots, fraction, options.lamda)
        x = xp.zeros(level.shape, dtype=np.complex64) if previous is None else level.upsample_from(x, previous)
        previous = level
        budget = options.max_iterations - total if last else min(options.coarse_iterations,
                                                                options.max_iterations - total)
        # thresholds in this level's voxels (coarser voxels: proportionally looser)
        coarse = 1.0 / float(np.min(level.scale_t))
        tol_t, tol_r = options.translation_tol * coarse, options.rotation_tol * coarse
        mu = np.full(nshot, options.damping)
        energy_prev = None
        done = 0
        converged = False
        stage = f"level {li + 1}/{len(options.levels)} {'x'.join(str(n) for n in level.shape)}"
        logger.debug("AlignSENSE %s, %d shots, %d coils", stage, nshot, level.ncoil)
        searches, start, limit, saved = 0, 0, budget, None
        if li == 0 and options.search_rotation > 0 and _SEARCH_FIRST:
            for _ in range(_SEARCH_FIRST):
                x = level.pcg(x, level.level_params(theta), _SEARCH_CG)
                found, jumped = _search(level, x, theta, options.search_rotation)
                x, theta = _remove_drift(level, x, found)
                if not jumped.any():
                    break
        while True:
            while done < limit:
                theta_l = level.level_params(theta)
                x = level.pcg(x, theta_l, options.cg_iterations)
                lin = level.linearise(x, theta_l)
                hess, grad, e_now = lin[2], lin[3], lin[4]
                diag = np.einsum("sii->si", hess)
                step = np.zeros_like(theta_l)
                for s in np.flatnonzero(free):
                    a = hess[s] + mu[s] * np.diag(np.maximum(diag[s], 1e-30))
                    try:
                        step[s] = -np.linalg.solve(a, grad[s])
                    except np.linalg.LinAlgError:
                        step[s] = 0
                joint = (options.motion_cg_iterations > 0 and (li > 0 or len(options.levels) == 1)
                         and float(np.max(np.abs(step))) < _JOINT_BELOW)
                dx: Any = None
                if joint:
                    dx, step = level.joint_step(x, theta_l, lin, mu, options.motion_cg_iterations)
                # trust region: at most max_step level voxels / degrees per iteration, so that x and the
                # motion move together (a far shot otherwise jumps against a blurred consensus)
                big = np.max(np.abs(step) / _MAX_STEP, axis=1, keepdims=True)
                if joint:
                    big = np.full_like(big, max(1.0, float(big.max())))
                    dx = dx * np.float32(1 / big[0, 0])
                step = step / np.maximum(big, 1.0)
                x_trial = x if dx is None else x + dx
                e_trial = level.residual_energy(x_trial, theta_l + step)
                if joint:
                    reg_now = level.lamda * float(xp.sum(xp.abs(x) ** 2))
                    reg_trial = level.lamda * float(xp.sum(xp.abs(x_trial) ** 2))
                    ok = np.full(nshot, e_trial.sum() + reg_trial < e_now.sum() + reg_now)
                    if ok[0]:
                        x = x_trial
                    else:
                        e_trial = e_now
                else:
                    ok = e_trial < e_now
                accept = free & ok
                reject = free & ~ok
                mu = np.where(accept, np.maximum(mu / _DAMP_DOWN, _DAMP_MIN),
                              np.where(reject, np.minimum(mu * _DAMP_UP, _DAMP_MAX), mu))
                step[~accept] = 0
                full_step = step.copy()
                full_step[:, :ndim] /= level.scale_t
                theta = theta + full_step
                x, theta = _remove_drift(level, x, theta)
                energy = float(np.where(accept, e_trial, e_now).sum() + level.lamda * float(xp.sum(xp.abs(x) ** 2)))
                residual.append(energy / max(level.data_energy, 1e-30))
                logger.debug("AlignSENSE %s it %d: joint=%s, accepted %d/%d, step %.3g, energy %.6g", stage, done,
                             joint, int(accept.sum()), int(free.sum()), float(np.max(np.abs(step))), residual[-1])
                done += 1
                total += 1
                if progress is not None:
                    progress(min(1.0, total / options.max_iterations), stage)
                small = (np.all(np.abs(step[:, :ndim]) < tol_t) and np.all(np.abs(step[:, ndim:]) < tol_r)
                         and not reject.any())
                flat = (energy_prev is not None
                        and abs(energy_prev - energy) <= options.energy_tol * max(energy_prev, 1e-30))
                energy_prev = energy
                if (small or flat) and done - start >= _MIN_LEVEL_ITERATIONS:
                    converged = True
                    break
            # a coarse search for shots stuck in a local minimum, on the first level, then the level again
            # (kept only if the level ends with a lower energy than before the jump)
            if saved is not None and saved[0] <= energy:
                energy, x, theta, converged = saved
                break
            if (li == 0 and searches < _SEARCH_ROUNDS and options.search_rotation > 0
                    and total < options.max_iterations):
                searches += 1
                found, jumped = _search(level, x, theta, options.search_rotation)
                if jumped.any():
                    saved = (energy, x, theta, converged)
                    x, theta = _remove_drift(level, x, found)
                    mu = np.full(nshot, options.damping)
                    energy_prev, converged = None, False
                    start, limit = done, done + min(budget, options.max_iterations - total)
                    continue
            break
        level_iterations.append(done)
        logger.debug("AlignSENSE %s: %d iterations, converged=%s, energy %.3g", stage, done, converged, residual[-1])
        if total >= options.max_iterations:
            break
    assert previous is not None  # the options have at least one level
    final = previous
    if final.shape != tuple(ksp.shape[1:]):  # the iteration limit came on a coarse level
        final = _Level(ksp, maps, shots, 1.0, options.lamda)
        x = final.upsample_from(x, previous)
    x = final.pcg(x, final.level_params(theta), options.cg_iterations)
    if options.reference is not None:
        ref = theta[options.reference].copy()
        x = motion.transform(x, ref).astype(np.complex64)
        theta = np.stack([motion.compose(t, motion.invert(ref)) for t in theta])
        theta[options.reference] = 0
    return AlignResult(x.astype(np.complex64), theta, total, bool(converged), residual, tuple(level_iterations))


def _fftn(x, axes: tuple[int, ...], inverse: bool):
    """Unitary, uncentred FFT over ``axes`` (threaded scipy on the host, cupy's on the device)."""
    xp = sp.get_array_module(x)
    if xp is np:
        fn = scipy.fft.ifftn if inverse else scipy.fft.fftn
        return fn(x, axes=axes, norm="ortho", workers=fft.WORKERS)
    return (xp.fft.ifftn if inverse else xp.fft.fftn)(x, axes=axes, norm="ortho")


def _search(level: _Level, x, theta: np.ndarray, span: float) -> tuple[np.ndarray, np.ndarray]:
    """Coarse search of each shot's motion against the others: a way out of local minima.

    For each shot ``s``: the image of the other shots (``_SEARCH_CG`` CG iterations from ``x`` with shot
    ``s`` left out, so that ``s`` does not pull the reference to its own, possibly wrong, position);
    rotation candidates every ``_SEARCH_STEP`` degrees within ``span`` of the current one (3D: about
    one axis at a time); for each, the best whole-voxel translation over the periodic grid by FFT
    correlation (:meth:`_Level.best_translations`); the candidate of the smallest exact residual
    replaces the current motion if its residual is smaller. Returns ``(theta, jumped)``.
    """
    nd, npar = level.ndim, theta.shape[1]
    nrot = npar - nd
    steps = np.arange(_SEARCH_STEP, span + 1e-9, _SEARCH_STEP)
    steps = np.concatenate([-steps[::-1], steps])
    offsets = [np.zeros(nrot)]
    for j in range(nrot):
        for a in steps:
            o = np.zeros(nrot)
            o[j] = a
            offsets.append(o)
    offset_array = np.array(offsets)
    theta_l = level.level_params(theta)
    out = theta.copy()
    jumped = np.zeros(level.nshot, dtype=bool)
    for s in range(level.nshot):
        weight = np.ones(level.nshot)
        weight[s] = 0
        ref = level.pcg(x, theta_l, _SEARCH_CG, weight)
        candidates = level.best_translations(ref, s, theta_l[s, nd:] + offset_array)
        e = level.shot_residuals(ref, s, np.concatenate([theta_l[s:s + 1], candidates]))
        best = int(np.argmin(e[1:]))
        if e[1 + best] < e[0] * (1 - _SEARCH_MARGIN):
            p = candidates[best].copy()
            p[:nd] /= level.scale_t
            out[s] = p
            theta_l[s] = candidates[best]
            jumped[s] = True
            logger.debug("AlignSENSE search: shot %d from %s to %s (residual %.4g -> %.4g)", s,
                         np.round(theta[s], 2).tolist(), np.round(p, 2).tolist(), e[0], e[1 + best])
    return out, jumped


def _remove_drift(level: _Level, x, theta: np.ndarray):
    """Take the mean motion ``g`` out of every shot (``theta_s g^-1``) and apply it to ``x``."""
    g = theta.mean(axis=0)
    if not np.any(g):
        return x, theta
    ginv = motion.invert(g)
    theta = np.stack([motion.compose(t, ginv) for t in theta])
    return motion.transform(x, level.level_params(g[None])[0]).astype(np.complex64, copy=False), theta


def sense(ksp, maps, shots, motion_params=None, lamda: float = 1e-4, niter: int = 30, tol: float = 1e-6):
    """SENSE on the same operator with known (or no) motion: preconditioned CG from zero.

    Args:
        ksp, maps: as :func:`align_sense`.
        shots: ``(nshot, *shape[:-1])`` bool lines of each shot, or one ``shape[:-1]`` sampling mask.
        motion_params: ``(nshot, 3 | 6)`` motion of each shot (None: none, plain SENSE).
        lamda: Tikhonov weight relative to the largest ``sum_c |S_c|^2``.
        niter: at most this many CG iterations.
        tol: stop when the preconditioned residual fell below ``tol`` times its initial value.

    Returns:
        ``shape`` complex64 image, same device as ``ksp``.
    """
    shots = _host(shots).astype(bool)
    if shots.ndim == ksp.ndim - 2:
        shots = shots[None]
    shots = _check(ksp, maps, shots)
    xp = sp.get_array_module(ksp)
    level = _Level(ksp, xp.asarray(maps), shots, 1.0, lamda)
    npar = motion.nparams(ksp.ndim - 1)
    theta = np.zeros((shots.shape[0], npar)) if motion_params is None else np.asarray(motion_params, dtype=np.float64)
    if theta.shape != (shots.shape[0], npar):
        raise ReconError(f"motion must be ({shots.shape[0]}, {npar}), got {theta.shape}")
    x = level.pcg(xp.zeros(level.shape, dtype=np.complex64), level.level_params(theta), niter, tol=tol)
    return x.astype(np.complex64)


# --- estimates ---------------------------------------------------------------------------------


#: Peak working memory of :func:`align_sense` (:func:`reconq.recon.estimates.alignsense_memory_bytes`).
memory_bytes = alignsense_memory_bytes


def expected_seconds(shape: Sequence[int], ncoil: int, nshot: int, options: AlignOptions | None = None) -> float:
    """Rough wall time of :func:`align_sense` on the host, seconds
    (:func:`reconq.recon.estimates.alignsense_seconds` with the options' iteration counts)."""
    options = options or AlignOptions()
    return alignsense_seconds(shape, ncoil, nshot, options.cg_iterations, options.levels, options.max_iterations,
                              options.coarse_iterations)


def extend_maps(maps, sigma: float = 4.0, threshold: float = 0.5):
    """Coil maps extended smoothly beyond the region where they are defined.

    ESPIRiT (and Walsh) maps are zero, or arbitrary, outside the object as it lay during the
    calibration; an object that moves between shots leaves that region, and a map of zero there makes
    its edges unreachable for the motion solver. Where ``sum_c |S_c|^2 < threshold`` the maps are
    replaced by their normalised convolution with a Gaussian of ``sigma`` voxels (the inside kept
    as it is): the smooth sensitivities continued outwards.

    Args:
        maps: ``(ncoil, *shape)`` complex64 (numpy or cupy), sum of squares about 1 inside.
        sigma: the Gaussian's standard deviation, voxels (periodic, by FFT).
        threshold: the sum of squares above which a voxel's maps are kept.

    Returns:
        ``(ncoil, *shape)`` complex64.
    """
    xp = sp.get_array_module(maps)
    shape = maps.shape[1:]
    inside = (xp.sum(xp.abs(maps) ** 2, axis=0) > threshold).astype(np.float32)
    k = [xp.fft.fftfreq(n).astype(np.float32) for n in shape]
    grids = xp.meshgrid(*k, indexing="ij")
    kernel = xp.exp(-2 * np.pi**2 * sigma**2 * sum(g * g for g in grids)).astype(np.float32)
    axes = tuple(range(-len(shape), 0))

    def blur(a):
        return xp.fft.ifftn(xp.fft.fftn(a, axes=axes) * kernel, axes=axes)

    weight = blur(inside).real
    filled = blur(maps * inside) / xp.maximum(weight, 1e-6)
    return xp.where(inside > 0, maps, filled).astype(np.complex64)
