"""Centered unitary FFTs and the sum of squares."""

import numpy as np
import pytest

from reconq.recon import fft
from reconq.recon.coils import sos


@pytest.mark.parametrize("axes", [(-1,), (-2, -1), (-3, -2, -1)])
def test_fft_is_unitary_and_inverted(axes):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 6, 8, 10)) + 1j * rng.standard_normal((4, 6, 8, 10))).astype(np.complex64)
    k = fft.fft(x, axes=axes)
    assert np.linalg.norm(k) == pytest.approx(np.linalg.norm(x), rel=1e-5)
    np.testing.assert_allclose(fft.ifft(k, axes=axes), x, atol=1e-5)


def test_fft_is_centered():
    x = np.zeros((8, 8), dtype=np.complex64)
    x[4, 4] = 1  # image centre at n // 2
    np.testing.assert_allclose(fft.fft(x), np.full((8, 8), 1 / 8), atol=1e-6)


def test_sos_combines_coils():
    img = np.array([[3, 0], [4j, 1]], dtype=np.complex64)  # (ncoil=2, n=2)
    np.testing.assert_allclose(sos(img, axis=0), [5, 1])
