"""Centered orthonormal FFTs over chosen axes, for numpy and cupy arrays.

The transforms are unitary (``norm="ortho"``) and centered: the k-space centre and the image
centre sit at index ``n // 2`` of each transformed axis, so ``ifft(fft(x)) == x`` and
``||fft(x)|| == ||x||``.

References:
    Ong F, Lustig M. SigPy: a python package for high performance iterative reconstruction.
    ISMRM 2019, p. 4819 (``sigpy.fft``/``sigpy.ifft``, the convention used here).
"""

from collections.abc import Sequence

import sigpy as sp


def fft(x, axes: Sequence[int] = (-2, -1)):
    """Centered unitary forward FFT (image to k-space).

    Args:
        x: complex array of any shape, numpy or cupy; the result is on the same device.
        axes: the axes to transform.

    Returns:
        An array of the same shape, complex.
    """
    return sp.fft(x, axes=tuple(axes), center=True, norm="ortho")


def ifft(x, axes: Sequence[int] = (-2, -1)):
    """Centered unitary inverse FFT (k-space to image); the inverse of :func:`fft`.

    Args:
        x: complex array of any shape, numpy or cupy; the result is on the same device.
        axes: the axes to transform.

    Returns:
        An array of the same shape, complex.
    """
    return sp.ifft(x, axes=tuple(axes), center=True, norm="ortho")
