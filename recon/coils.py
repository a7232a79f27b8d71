"""Coil combination: root sum of squares, and combination with coil maps (adaptive or SENSE maps).

References:
    Roemer PB, Edelstein WA, Hayes CE, Souza SP, Mueller OM. The NMR phased array.
    Magn Reson Med 1990;16:192-225.
    Walsh DO, Gmitro AF, Marcellin MW. Adaptive reconstruction of phased array MR imagery.
    Magn Reson Med 2000;43:682-690.
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


def combine_with_maps(img, mps, eps: float = 1e-12):
    """Roemer combination ``sum_c conj(m_c) x_c / sum_c |m_c|^2``.

    Args:
        img: ``(ncoil, ...)`` complex coil images (pre-whitened).
        mps: ``(ncoil, ...)`` complex coil maps of the same shape.

    Returns:
        ``(...)`` complex image.
    """
    xp = sp.get_array_module(img)
    return xp.sum(xp.conj(mps) * img, axis=0) / (xp.sum(xp.abs(mps) ** 2, axis=0) + eps)
