"""The offline reconstruction of `examples/offline_recon.py`, inline: a ReconQ pipeline.

Put this file in the folder named by RECONQ_PLUGIN_DIR (or register `recon` as an entry point in the
group `reconq.pipelines`); scans whose config names `hann_fft` are then reconstructed by it.
"""

import numpy as np

PIPELINE_NAME = "hann_fft"


def ifft2c(k: np.ndarray) -> np.ndarray:
    """Centred 2D inverse FFT over the first two axes (Col, Lin)."""
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(0, 1)), axes=(0, 1), norm="ortho"), axes=(0, 1))


def reconstruct(twix, filter_strength: float = 1.0):
    image = twix.image
    image.squeeze = False
    image.remove_os = True
    ksp = image.select(Ave=0, Eco=0, Rep=0, Set=0, Seg=0, Phs=0, Par=0)  # (Col, Cha, Lin, Sli)
    nlin = ksp.shape[2]
    hann = 0.5 * (1 + np.cos(2 * np.pi * (np.arange(nlin) - nlin // 2) / nlin))  # 1 at the k-space centre
    window = 1 - filter_strength + filter_strength * hann
    ksp = ksp * window[None, None, :, None]
    img = ifft2c(np.moveaxis(ksp, 1, -1))  # (Col, Lin, Sli, Cha)
    sos = np.sqrt((np.abs(img) ** 2).sum(axis=-1))  # (Col, Lin, Sli)
    print(f"{twix.hdr.Config.ProtocolName}: {sos.shape[2]} slices of {sos.shape[0]} x {sos.shape[1]}")
    return sos


def recon(twix, params, progress):
    progress(0.1, "filter and FFT")
    sos = reconstruct(twix, filter_strength=float(params.get("filter_strength", 1.0)))
    return sos.transpose(2, 1, 0)  # (Col, Lin, Sli) -> (Sli, Lin, Col): one image per slice
