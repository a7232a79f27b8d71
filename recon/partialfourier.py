"""Partial Fourier and asymmetric echo: projection onto convex sets (POCS).

A k-space acquired over ``[lo, hi)`` of an axis that is not symmetric about the centre (index
``n // 2``) lacks the conjugate half of its edge. POCS takes the image phase from the symmetric
centre (Hann-windowed), then alternates between imposing that phase in image space and restoring
the acquired samples in k-space.

References:
    Haacke EM, Lindskog ED, Lin W. A fast, iterative, partial-Fourier technique capable of local
    phase recovery. J Magn Reson 1991;92:126-145.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import sigpy as sp

from reconq.recon import fft

#: ``{axis: (lo, hi)}``: the acquired index range of each partial k-space axis.
Extents = Mapping[int, tuple[int, int]]


def _profiles(shape, extents: Extents, xp, ndim: int):
    """Broadcastable acquired-mask and low-pass window for the partial axes."""
    acquired, lowpass = 1.0, 1.0
    for axis, (lo, hi) in extents.items():
        n = shape[axis]
        c = n // 2
        half = max(min(c - lo, hi - 1 - c), 1)
        mask = np.zeros(n, dtype=np.float32)
        mask[lo:hi] = 1
        window = np.zeros(n, dtype=np.float32)
        window[c - half: c + half + 1] = np.hanning(2 * half + 3)[1:-1]
        view = [1] * ndim
        view[axis] = n
        acquired = acquired * xp.asarray(mask.reshape(view))
        lowpass = lowpass * xp.asarray(window.reshape(view))
    return acquired, lowpass


def pocs(ksp, extents: Extents, axes: Sequence[int] = (-2, -1), niter: int = 8):
    """Complete a partial k-space.

    Args:
        ksp: complex64 k-space ``(..., [nz,] ny, nx)``, zero outside the acquired extents; numpy or cupy.
        extents: ``{axis: (lo, hi)}`` for each partial axis (negative axes among ``axes``).
        axes: the spatial axes (all of them: the phase is smooth only in image space).
        niter: iterations.

    Returns:
        k-space of the same shape and dtype: the acquired samples kept, the others filled.
    """
    if not extents:
        return ksp
    xp = sp.get_array_module(ksp)
    acquired, lowpass = _profiles(ksp.shape, extents, xp, ksp.ndim)
    phase = xp.exp(1j * xp.angle(fft.ifft(ksp * lowpass, axes=axes))).astype(ksp.dtype)
    img = fft.ifft(ksp, axes=axes)
    for _ in range(niter):
        est = fft.fft(xp.abs(img) * phase, axes=axes)
        est = ksp * acquired + est * (1 - acquired)
        img = fft.ifft(est, axes=axes)
    return est.astype(ksp.dtype)


def pocs_image(img, extents: Extents, axes: Sequence[int] = (-2, -1), niter: int = 8):
    """POCS on an image whose k-space (the FFT over ``axes``) is partial; returns the completed image.

    Args:
        img: complex image ``(..., [nz,] ny, nx)``, e.g. a coil-combined SENSE image.
        extents: as for :func:`pocs`, on the image's own k-space grid.
    """
    if not extents:
        return img
    xp = sp.get_array_module(img)
    acquired, _ = _profiles(img.shape, extents, xp, img.ndim)
    ksp = fft.fft(img, axes=axes) * acquired
    return fft.ifft(pocs(ksp.astype(img.dtype), extents, axes=axes, niter=niter), axes=axes)
