"""Noise pre-whitening from noise-measurement readouts.

With ``Psi = L L^H`` the channels' noise covariance, ``W = L^-1`` makes the noise white and of unit
variance in every channel, so that sum of squares, coil maps and SENSE are optimal in SNR
(Roemer) and need no covariance of their own (Pruessmann). Noise variance scales with the receiver
bandwidth, so noise sampled with a dwell time ``t_n`` whitens data of dwell ``t_d`` with
``W * sqrt(t_d / t_n)``.

References:
    Roemer PB et al. The NMR phased array. Magn Reson Med 1990;16:192-225.
    Pruessmann KP, Weiger M, Boernert P, Boesiger P. Advances in sensitivity encoding with
    arbitrary k-space trajectories. Magn Reson Med 2001;46:638-651.
"""

from __future__ import annotations

import numpy as np
import sigpy as sp

from reconq.recon.errors import ReconError


def noise_covariance(noise: np.ndarray) -> np.ndarray:
    """Channel noise covariance.

    Args:
        noise: ``(ncoil, nsamples)`` complex noise samples.

    Returns:
        ``(ncoil, ncoil)`` complex128 Hermitian covariance.
    """
    noise = np.asarray(noise, dtype=np.complex128)
    return noise @ noise.conj().T / max(noise.shape[1], 1)


def whitening_matrix(cov: np.ndarray, noise_dwell_us: float | None = None,
                     data_dwell_us: float | None = None) -> np.ndarray:
    """``(ncoil, ncoil)`` complex64 lower-triangular ``W`` with ``W cov W^H = I`` (scaled for dwell times)."""
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError as e:
        raise ReconError(f"noise covariance is not positive definite: {e}") from e
    w = np.linalg.inv(chol)
    if noise_dwell_us and data_dwell_us:
        w = w * np.sqrt(data_dwell_us / noise_dwell_us)
    return w.astype(np.complex64)


def prewhiten(ksp, w):
    """Apply a whitening matrix along the coil axis.

    Args:
        ksp: ``(ncoil, ...)`` complex64, numpy or cupy.
        w: ``(ncoil, ncoil)`` whitening matrix (copied to the device of ``ksp``).

    Returns:
        ``(ncoil, ...)`` complex64 whitened data.
    """
    xp = sp.get_array_module(ksp)
    w = xp.asarray(w, dtype=ksp.dtype)
    return (w @ ksp.reshape(ksp.shape[0], -1)).reshape(ksp.shape)
