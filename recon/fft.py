"""Centered orthonormal FFTs over chosen axes, for numpy and cupy arrays.

The transforms are unitary (``norm="ortho"``) and centered: the k-space centre and the image
centre sit at index ``n // 2`` of each transformed axis, so ``ifft(fft(x)) == x`` and
``||fft(x)|| == ||x||``.

References:
    Ong F, Lustig M. SigPy: a python package for high performance iterative reconstruction.
    ISMRM 2019, p. 4819 (``sigpy.fft``/``sigpy.ifft``, the convention used here).
"""

import os
from collections.abc import Sequence

import numpy as np
import scipy.fft
import sigpy as sp

#: Threads for host FFTs (scipy's pocketfft); device FFTs are cupy's.
WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _transform(x, axes: tuple[int, ...], inverse: bool):
    xp = sp.get_array_module(x)
    if xp is not np:
        return (sp.ifft if inverse else sp.fft)(x, axes=axes, center=True, norm="ortho")
    x = np.asarray(x)
    if not np.iscomplexobj(x):
        x = x.astype(np.complex64 if x.dtype == np.float32 else np.complex128)
    fn = scipy.fft.ifftn if inverse else scipy.fft.fftn
    y = fn(scipy.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho", workers=WORKERS)
    return scipy.fft.fftshift(y, axes=axes)


def fft(x, axes: Sequence[int] = (-2, -1)):
    """Centered unitary forward FFT (image to k-space).

    Args:
        x: complex array of any shape, numpy or cupy; the result is on the same device.
        axes: the axes to transform.

    Returns:
        An array of the same shape, complex.
    """
    return _transform(x, tuple(axes), inverse=False)


def ifft(x, axes: Sequence[int] = (-2, -1)):
    """Centered unitary inverse FFT (k-space to image); the inverse of :func:`fft`.

    Args:
        x: complex array of any shape, numpy or cupy; the result is on the same device.
        axes: the axes to transform.

    Returns:
        An array of the same shape, complex.
    """
    return _transform(x, tuple(axes), inverse=True)
