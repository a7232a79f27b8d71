"""An "offline" reconstruction, as a physicist writes it against twix data on a workstation.

    python examples/offline_recon.py raw.h5 out.npy

It reads the scan through ReconQ's twix-like object (as `twixtools`/`mapVBVD` would give it), removes
readout oversampling, applies a Hann filter along the phase encodes, inverse-FFTs and combines the
coils. `examples/plugins/hann_fft.py` is the same code as an inline ReconQ pipeline; `diff` the two.
"""

import sys

import numpy as np

from reconq.parametermaps import read_twix


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


if __name__ == "__main__":
    twix = read_twix(sys.argv[1])
    sos = reconstruct(twix, filter_strength=1.0)
    np.save(sys.argv[2], sos)
