"""Cartesian round trips: synthetic scan -> MRD file -> RawScan -> pipeline "cartesian" -> images.

The images are uint16 with the series maximum at 2**12 - 1, so the quantisation alone gives a
normalised RMS error of about 1e-4; the bound is NRMSE < 1e-3 (noise-free data).
"""

import numpy as np
import pytest

from reconq.recon.rawdata import RawScan
from reconq.recon.registry import get_pipeline
from reconq.recon.simulate import synthetic_scan, write_mrd

NRMSE_BOUND = 1e-3


def run_cartesian(scan, tmp_path, params=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    with RawScan.open(write_mrd(scan, tmp_path / "raw.h5")) as raw:
        return get_pipeline("cartesian").run(raw, params or {}, lambda fraction, stage: None)


def magnitudes(images):
    return np.stack([image.data[0, 0] for image in images]).astype(np.float64)


def expected(scan):
    """The truth weighted by the coils' root sum of squares (what a SoS recon gives)."""
    return scan.truth * np.sqrt(np.sum(np.abs(scan.mps) ** 2, axis=0))


def nrmse(mag, ref):
    mag, ref = mag / mag.max(), ref / ref.max()
    return np.linalg.norm(mag - ref) / np.linalg.norm(ref)


def test_round_trip_2d_multislice(tmp_path):
    scan = synthetic_scan(matrix=(64, 48), ncoil=8, nslices=3, readout_oversampling=2, noise_readouts=2)
    images = run_cartesian(scan, tmp_path, {"prewhiten": False})  # 2 noise readouts: a poor covariance
    assert len(images) == 3
    assert [image.slice for image in images] == [0, 1, 2]
    assert all(truth.max() > 0.5 for truth in scan.truth)  # no empty slice
    assert nrmse(magnitudes(images), expected(scan)) < NRMSE_BOUND


def test_round_trip_3d(tmp_path):
    scan = synthetic_scan(matrix=(32, 40), ncoil=8, nz=16, fov_mm=(200.0, 160.0, 64.0))
    images = run_cartesian(scan, tmp_path)
    assert len(images) == 16
    assert magnitudes(images).shape == (16, 32, 40)
    assert nrmse(magnitudes(images), expected(scan)) < NRMSE_BOUND


def test_averages_are_averaged_and_repetitions_kept_apart(tmp_path):
    errors = []
    for naverages in (1, 4):
        scan = synthetic_scan(matrix=(32, 32), ncoil=4, nslices=2, nrepetitions=2, naverages=naverages,
                              noise=0.01, seed=naverages)
        images = run_cartesian(scan, tmp_path / f"avg{naverages}")
        assert len(images) == 4  # 2 slices x 2 repetitions, averages merged
        assert sorted((i.repetition, i.slice) for i in images) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        errors.append(nrmse(magnitudes(images), expected(scan)[[image.slice for image in images]]))
    # noise 0.01 per part: NRMSE about 0.1 with one average; four averages halve the noise
    assert errors[0] < 0.2
    assert errors[1] < 0.65 * errors[0]


def test_progress_reports_the_stages(tmp_path):
    scan = synthetic_scan(matrix=(16, 16), ncoil=2)
    seen = []
    with RawScan.open(write_mrd(scan, tmp_path / "raw.h5")) as raw:
        get_pipeline("cartesian").run(raw, {"chunk": 4}, lambda f, stage: seen.append((f, stage)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {"reading", "fft", "images"} <= {stage for _, stage in seen}


def test_buffer_averages_and_centres_lines():
    import ismrmrd

    from reconq.recon.kspace import CartesianEncoding, KspaceBuffer

    scan = synthetic_scan(matrix=(8, 4), ncoil=2, readout_oversampling=2)
    enc = CartesianEncoding.from_header(scan.header)
    assert enc.enc_matrix == (8, 8, 1) and enc.recon_matrix == (4, 8, 1)
    heads = np.zeros(3, dtype=ismrmrd.hdf5.acquisition_header_dtype)
    heads["number_of_samples"], heads["center_sample"] = 8, 4
    heads["idx"]["kspace_encode_step_1"] = [4, 4, 0]  # centre line twice, first line once
    heads[2]["flags"] = np.uint64(1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1))
    data = [np.full((2, 8), value, dtype=np.complex64) for value in (1.0, 3.0, 100.0)]
    buffer = KspaceBuffer(enc)
    buffer.add(heads, data)
    ksp = buffer.kspace(buffer.volume_keys()[0])
    assert ksp.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(ksp[:, 0, 4], 2.0)  # centre line at n // 2, the two averaged
    assert np.count_nonzero(ksp) == 16 and buffer.skipped == 1  # the noise readout is not used


@pytest.mark.gpu
def test_gpu_recon_matches_cpu(tmp_path, cuda):
    scan = synthetic_scan(matrix=(32, 32), ncoil=4, nslices=2)
    cpu = magnitudes(run_cartesian(scan, tmp_path / "cpu"))
    gpu = magnitudes(run_cartesian(scan, tmp_path / "gpu", {"device": 0}))
    np.testing.assert_allclose(gpu, cpu, atol=1)  # uint16 rounding
