"""Pre-processing: noise pre-whitening, partial Fourier (POCS), reverse readouts, averages, Walsh combination."""

import numpy as np
import pytest

from reconq.recon.noise import noise_covariance, prewhiten, whitening_matrix
from reconq.recon.rawdata import RawScan
from reconq.recon.registry import get_pipeline
from reconq.recon.simulate import synthetic_scan, write_mrd


def nrmse(mag, ref):
    mag, ref = mag / mag.max(), ref / ref.max()
    return float(np.linalg.norm(mag - ref) / np.linalg.norm(ref))


def run(scan, tmp_path, params=None, name="cartesian"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    with RawScan.open(write_mrd(scan, tmp_path / "raw.h5")) as raw:
        images = get_pipeline(name).run(raw, params or {}, lambda fraction, stage: None)
    return images, np.stack([image.data[0, 0] for image in images]).astype(np.float64)


def test_prewhitening_makes_noise_white():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 4)) + 1j * rng.standard_normal((4, 4))
    cov = a @ a.conj().T + 4 * np.eye(4)
    noise = np.linalg.cholesky(cov) @ (rng.standard_normal((4, 200_000)) + 1j * rng.standard_normal((4, 200_000)))
    w = whitening_matrix(noise_covariance(noise))
    white = prewhiten(noise.astype(np.complex64), w)
    np.testing.assert_allclose(noise_covariance(white), np.eye(4), atol=0.02)
    # dwell-time scaling: noise sampled 4x slower has 1/4 the variance of the data's
    np.testing.assert_allclose(whitening_matrix(cov, 40.0, 10.0), whitening_matrix(cov) / 2, rtol=1e-5)


def test_prewhitening_in_the_pipeline(tmp_path):
    """Sum of squares of whitened data is the object times the root sum of squares of the whitened maps."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((6, 6)) + 1j * rng.standard_normal((6, 6))
    cov = (a @ a.conj().T + np.eye(6)) / 6
    scan = synthetic_scan(matrix=(48, 48), ncoil=6, noise=1e-4, noise_readouts=256, noise_cov=cov, seed=5)
    _, white = run(scan, tmp_path / "w")
    _, raw = run(scan, tmp_path / "r", {"prewhiten": False})
    w = np.linalg.inv(np.linalg.cholesky(cov))
    whitened_rss = np.sqrt(np.sum(np.abs(np.einsum("cd,d...->c...", w, scan.mps)) ** 2, axis=0))
    assert nrmse(white, scan.truth * whitened_rss) < 0.01
    assert nrmse(raw, scan.truth) < 0.01 < nrmse(white, scan.truth)


@pytest.mark.parametrize(("options", "bound"), [
    ({"partial_fourier": (0.75, 1.0)}, 0.03),
    ({"asymmetric_echo": 0.75, "reverse_odd_lines": True}, 0.03),
    ({"nz": 16, "fov_mm": (256.0, 256.0, 64.0), "partial_fourier": (0.75, 1.0), "phase_oversampling": 0.5}, 0.05),
])
def test_partial_fourier_by_pocs(tmp_path, options, bound):
    scan = synthetic_scan(**{"matrix": (64, 64), "ncoil": 4, **options})
    _, mag = run(scan, tmp_path)
    assert mag.shape == scan.truth.shape
    assert nrmse(mag, scan.truth) < bound


def test_reverse_readouts_are_turned_round(tmp_path):
    scan = synthetic_scan(matrix=(32, 32), ncoil=4, reverse_odd_lines=True)
    assert any(acq.is_flag_set(22) for acq in scan.acquisitions)  # ACQ_IS_REVERSE
    _, mag = run(scan, tmp_path)
    assert nrmse(mag, scan.truth) < 1e-3


def test_averages_kept_apart_on_request(tmp_path):
    scan = synthetic_scan(matrix=(16, 16), ncoil=2, naverages=3)
    images, _ = run(scan, tmp_path, {"keep_averages": True})
    assert sorted(image.average for image in images) == [0, 1, 2]


def test_walsh_combination(tmp_path):
    scan = synthetic_scan(matrix=(64, 64), ncoil=8)
    _, mag = run(scan, tmp_path, {"combine": "walsh"})
    assert nrmse(mag, scan.truth) < 0.02
