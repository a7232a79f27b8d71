"""Cartesian reconstruction of one buffered volume: partial Fourier, FFT, oversampling removed, coil combination.

The volume comes from :class:`reconq.recon.kspace.KspaceBuffer`. Partial Fourier and asymmetric
echoes are filled by POCS; readout (and phase) oversampling is removed and the image cropped to the
header's recon space.

References:
    Roemer PB et al. The NMR phased array. Magn Reson Med 1990;16:192-225.
    Haacke EM et al. A fast, iterative, partial-Fourier technique capable of local phase recovery.
    J Magn Reson 1991;92:126-145.
"""

from __future__ import annotations

import numpy as np
import sigpy as sp

from reconq.recon import fft
from reconq.recon.coils import sos
from reconq.recon.errors import ReconError
from reconq.recon.kspace import CartesianEncoding, kspace_matrix
from reconq.recon.partialfourier import Extents, pocs


def reconstruct(ksp, enc: CartesianEncoding, extents: Extents | None = None, combine: str = "sos"):
    """Reconstruct one fully sampled volume.

    Partial k-space (``extents``) is first completed by POCS, coil by coil. The k-space is then
    zero-padded (or cropped) to the matrix whose pixel size is the recon space's
    (``recon_matrix * enc_fov / recon_fov``), transformed, and cropped in image space to the recon
    matrix: this removes readout (and phase or slice) oversampling.

    Args:
        ksp: ``(ncoil, nz, ny, nx)`` complex64 encoded k-space, numpy or cupy (pre-whitened).
        enc: the encoding.
        extents: the acquired extent of partial axes (:func:`reconq.recon.kspace.partial_fourier_extents`).
        combine: ``"sos"`` (root sum of squares) or ``"walsh"`` (adaptive combination).

    Returns:
        ``(nz, ny, nx)`` float32 magnitude in the recon matrix (nz is 1 for 2D), on the device of ``ksp``.
    """
    axes = (-3, -2, -1) if enc.is3d else (-2, -1)
    if extents:
        ksp = pocs(ksp, extents, axes=axes)
    ncoil = ksp.shape[0]
    ksp = sp.resize(ksp, (ncoil,) + kspace_matrix(enc))
    coil_img = fft.ifft(ksp, axes=axes)
    nx, ny, nz = enc.recon_matrix
    coil_img = sp.resize(coil_img, (ncoil, nz if enc.is3d else 1, ny, nx))
    if combine == "walsh":
        from reconq.recon.coilmaps import walsh_maps
        from reconq.recon.coils import combine_with_maps

        xp = sp.get_array_module(coil_img)
        return xp.abs(combine_with_maps(coil_img, walsh_maps(coil_img))).astype(np.float32)
    if combine != "sos":
        raise ReconError(f"combine={combine!r}: must be 'sos' or 'walsh'")
    return sos(coil_img, axis=0).astype(np.float32)
