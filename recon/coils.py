"""Coil combination.

References:
    Roemer PB, Edelstein WA, Hayes CE, Souza SP, Mueller OM. The NMR phased array.
    Magn Reson Med 1990;16:192-225.
"""

import sigpy as sp


def sos(img, axis: int = 0):
    """Root sum of squares over the coil axis.

    Args:
        img: complex coil images, e.g. ``(ncoil, ny, nx)`` complex64, numpy or cupy.
        axis: the coil axis.

    Returns:
        Real magnitude, the input shape without ``axis``, float32 for complex64 input.
    """
    xp = sp.get_array_module(img)
    return xp.sqrt(xp.sum(xp.abs(img) ** 2, axis=axis))
