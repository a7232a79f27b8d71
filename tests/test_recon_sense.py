"""SENSE: operators, solvers, and accuracy on phantoms with known coil maps.

Error is the normalised RMS error of the magnitude against the phantom (both scaled to unit
maximum), noise-free data. Bounds, with what limits them:

* SENSE with the true maps is exact to float32 and the Tikhonov bias (NRMSE < 1e-3 at R = 2).
* With ESPIRiT maps from 24 calibration lines the maps' error dominates: fully sampled < 0.01,
  R = 2 < 0.03, R = 4 (partial Fourier 3/4, 25 % phase oversampling) < 0.08, R = 2 with an
  asymmetric echo (0.8), reversed lines and separate calibration < 0.08, 3D R = 2 x 2 < 0.15.
* Maps from a reference scan of another geometry (3D, coarser, larger FOV, tilted) give images
  within 0.05 of SENSE with the true maps.
"""

import numpy as np
import pytest

from reconq.recon import fft, sense
from reconq.recon.rawdata import RawScan
from reconq.recon.registry import get_pipeline
from reconq.recon.simulate import synthetic_scan, write_mrd


def nrmse(mag, ref):
    mag, ref = mag / mag.max(), ref / ref.max()
    return float(np.linalg.norm(mag - ref) / np.linalg.norm(ref))


def run(scan, tmp_path, params=None, name="sense", filename="raw.h5"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    with RawScan.open(write_mrd(scan, tmp_path / filename)) as raw:
        images = get_pipeline(name).run(raw, params or {}, lambda fraction, stage: None)
    return images, np.stack([image.data[0, 0] for image in images]).astype(np.float64)


def random_complex(rng, shape):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def test_sense_operator_is_adjoint():
    rng = np.random.default_rng(0)
    mps, x, y = random_complex(rng, (3, 6, 4, 16)), random_complex(rng, (3, 4, 16)), random_complex(rng, (3, 6, 4, 16))
    mask = rng.random((4, 16)) > 0.5
    a = sense.sense_op(mps, mask)
    assert np.vdot(a(x), y) == pytest.approx(np.vdot(x, a.H(y)), rel=1e-4)


@pytest.mark.parametrize("offsets", [(0, 0), (3, 1), (1, 0)])
def test_unfold_and_cg_invert_regular_undersampling(offsets):
    rng = np.random.default_rng(1)
    mps, x = random_complex(rng, (2, 12, 4, 16)), random_complex(rng, (2, 4, 16))
    mask = np.zeros((4, 16), dtype=bool)
    mask[offsets[1]::2, offsets[0]::4] = True
    ksp = sense.sense_op(mps, mask)(x)
    assert sense.lattice(mask, (4, 2)) == offsets
    np.testing.assert_allclose(sense.unfold(ksp, mps, (4, 2), offsets, lamda=0), x, atol=1e-4)
    np.testing.assert_allclose(sense.cg_sense(ksp, mps, mask, lamda=0, niter=100), x, atol=1e-3)


def test_alias_weights_fold_a_point():
    point = np.zeros(12, dtype=np.complex64)
    point[5] = 1
    mask = np.zeros(12)
    mask[1::3] = 1
    folded = fft.ifft(mask * fft.fft(point, axes=(0,)), axes=(0,))
    w = sense.alias_weights(12, 3, 1)
    np.testing.assert_allclose([folded[(5 + 4 * s) % 12] for s in range(3)], w, atol=1e-6)
    assert np.count_nonzero(np.abs(folded) > 1e-6) == 3


@pytest.mark.parametrize(("options", "bound"), [
    ({}, 0.01),
    ({"acceleration": (2, 1)}, 0.03),
    ({"acceleration": (4, 1), "ncoil": 16, "partial_fourier": (0.75, 1.0), "phase_oversampling": 0.25}, 0.08),
    ({"acceleration": (2, 1), "calibration": "separate", "asymmetric_echo": 0.8, "reverse_odd_lines": True}, 0.08),
])
def test_sense_2d_accuracy(tmp_path, options, bound):
    scan = synthetic_scan(**{"matrix": (96, 80), "ncoil": 8, "nslices": 2, **options})
    images, mag = run(scan, tmp_path)
    assert len(images) == 2 and mag.shape == scan.truth.shape  # oversampling removed, recon space
    assert nrmse(mag, scan.truth) < bound


def test_sense_3d_accuracy(tmp_path):
    scan = synthetic_scan(matrix=(40, 32), ncoil=12, nz=24, fov_mm=(200.0, 160.0, 96.0),
                          acceleration=(2, 2), acs_lines=(16, 16))
    _, mag = run(scan, tmp_path, {"batch": 8})
    assert mag.shape == (24, 40, 32)
    assert nrmse(mag, scan.truth) < 0.15


def test_cg_agrees_with_unfolding(tmp_path):
    scan = synthetic_scan(matrix=(64, 64), ncoil=8, acceleration=(2, 1))
    _, unfolded = run(scan, tmp_path / "u", {"method": "unfold"})
    _, cg = run(scan, tmp_path / "c", {"method": "cg", "niter": 50})
    assert nrmse(cg, unfolded) < 0.01


def test_true_maps_give_the_phantom():
    from reconq.recon.kspace import CartesianEncoding, KspaceBuffer
    from reconq.recon.senserecon import SenseOptions, sense_volume, solve_grid

    scan = synthetic_scan(matrix=(64, 64), ncoil=8, acceleration=(2, 1), phase_oversampling=0.25)
    buffer = KspaceBuffer(CartesianEncoding.from_header(scan.header))
    buffer.add(*_heads_and_data(scan))
    key = buffer.volume_keys()[0]
    grid = solve_grid(buffer.centre_head(key), buffer.enc)
    true_maps = (scan.body.maps(grid.points()), grid)
    img = sense_volume(buffer, key, scan.header, SenseOptions(lamda=1e-6), reference=true_maps)
    assert nrmse(np.abs(img), scan.truth) < 1e-3


def _heads_and_data(scan):
    import ismrmrd

    heads = np.stack([np.frombuffer(a.getHead(), dtype=ismrmrd.hdf5.acquisition_header_dtype)[0]
                      for a in scan.acquisitions])
    return heads, [a.data for a in scan.acquisitions]


def test_reference_scan_of_another_geometry(tmp_path):
    from scipy.spatial.transform import Rotation

    from reconq.recon.kspace import CartesianEncoding, KspaceBuffer
    from reconq.recon.senserecon import SenseOptions, sense_volume, solve_grid

    tilt = Rotation.from_euler("xz", [15, 10], degrees=True).as_matrix()
    target = synthetic_scan(matrix=(96, 96), ncoil=8, nslices=2, acceleration=(2, 1), acs_lines=(0, 0),
                            rotation=tilt, position=(4.0, -6.0, 10.0), fov_mm=(220.0, 220.0, 5.0), slice_gap=5.0)
    reference = synthetic_scan(matrix=(32, 32), ncoil=8, nz=16, fov_mm=(300.0, 300.0, 120.0),
                               body=target.body, readout_oversampling=1)
    ref_path = write_mrd(reference, tmp_path / "reference.h5")
    _, mag = run(target, tmp_path, {"reference": str(ref_path)})

    buffer = KspaceBuffer(CartesianEncoding.from_header(target.header))
    buffer.add(*_heads_and_data(target))
    truth_maps = []
    for key in buffer.volume_keys():
        grid = solve_grid(buffer.centre_head(key), buffer.enc)
        true_maps = (target.body.maps(grid.points()), grid)
        img = sense_volume(buffer, key, target.header, SenseOptions(), reference=true_maps)
        truth_maps.append(np.abs(img[0]))
    assert nrmse(mag, np.stack(truth_maps)) < 0.05
    assert nrmse(mag, target.truth) < 0.06


def test_without_calibration_lines_or_reference_is_refused(tmp_path):
    from reconq.recon.errors import ReconError

    scan = synthetic_scan(matrix=(32, 32), ncoil=4, acceleration=(2, 1), acs_lines=(0, 0))
    with pytest.raises(ReconError, match="calibration lines"):
        run(scan, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["unfold", "cg"])
def test_gpu_sense_matches_cpu(tmp_path, method, cuda):
    scan = synthetic_scan(matrix=(64, 64), ncoil=8, nslices=2, acceleration=(2, 1))
    _, cpu = run(scan, tmp_path / "cpu", {"method": method, "niter": 30})
    _, gpu = run(scan, tmp_path / "gpu", {"method": method, "niter": 30, "device": 0})
    assert nrmse(gpu, cpu) < 1e-3  # the same maths in float32 on another device


def _phantom_calibration(shape, ncoil, acs):
    """K-space ``(ncoil, *shape)`` of the phantom with only the central ``acs`` lines in y and z."""
    from reconq.recon.geometry import Grid
    from reconq.recon.simulate import Body

    nz, ny, nx = shape
    body = Body(centre=np.zeros(3), axes=np.eye(3), semi_axes=np.array([nx / 2, ny / 2, max(nz / 2, 1.5)]),
                ncoil=ncoil)
    truth, mps = body.sample(Grid.make((0, 0, 0), np.eye(3), (1.0, 1.0, 1.0), shape))
    ksp = fft.fft(mps * truth, axes=(-3, -2, -1) if nz > 1 else (-2, -1)).astype(np.complex64)
    keep = np.zeros((nz, ny), dtype=bool)
    keep[max(nz // 2 - acs // 2, 0):nz // 2 + acs // 2 + (nz == 1), ny // 2 - acs // 2:ny // 2 + acs // 2] = True
    return ksp * keep[None, :, :, None]


def test_hybrid_espirit_agrees_with_sigpy_in_3d():
    from reconq.recon.coilmaps import espirit_maps

    calib = _phantom_calibration((20, 28, 32), 8, 16)
    hybrid = espirit_maps(calib, 16, lowres=24, method="hybrid")
    ref = espirit_maps(calib, 16, lowres=24, method="sigpy")
    assert hybrid.shape == ref.shape == (8, 20, 24, 24)
    support, ref_support = np.abs(hybrid).sum(0) > 0, np.abs(ref).sum(0) > 0
    assert np.mean(support == ref_support) > 0.999 and support.mean() > 0.3
    both = support & ref_support
    assert np.linalg.norm((hybrid - ref)[:, both]) < 1e-3 * np.linalg.norm(ref[:, both])


def test_2d_espirit_maps_are_sigpy_unchanged():
    import sigpy as sp
    import sigpy.mri

    from reconq.recon.coilmaps import espirit_maps

    calib = _phantom_calibration((1, 64, 64), 8, 24)
    mps = espirit_maps(calib, 24, lowres=48)
    ref = sigpy.mri.app.EspiritCalib(sp.resize(calib[:, 0], (8, 48, 48)), calib_width=24, thresh=0.02,
                                     kernel_width=6, crop=0.8, max_iter=30, show_pbar=False).run()
    np.testing.assert_array_equal(mps[:, 0], ref)


def test_bad_espirit_method_is_refused():
    from reconq.recon.coilmaps import espirit_maps
    from reconq.recon.errors import ReconError

    with pytest.raises(ReconError, match="ESPIRiT method 'svd'"):
        espirit_maps(_phantom_calibration((12, 16, 16), 4, 12), 12, method="svd")


def test_3d_pipeline_uses_hybrid_espirit(tmp_path, monkeypatch):
    import sigpy.mri

    from reconq.recon import coilmaps

    calls = []
    hybrid = coilmaps.espirit_hybrid
    monkeypatch.setattr(coilmaps, "espirit_hybrid", lambda *a, **k: calls.append(a[0].shape) or hybrid(*a, **k))

    def refuse(*args, **kwargs):
        raise AssertionError("sigpy's EspiritCalib called for a 3D scan")

    monkeypatch.setattr(sigpy.mri.app, "EspiritCalib", refuse)
    scan = synthetic_scan(matrix=(40, 32), ncoil=12, nz=24, fov_mm=(200.0, 160.0, 96.0),
                          acceleration=(2, 2), acs_lines=(16, 16))
    _, mag = run(scan, tmp_path, {"batch": 8})
    assert calls and len(calls[0]) == 4  # (ncoil, nz, ny, nx) on the coarse grid
    assert nrmse(mag, scan.truth) < 0.15


def test_3d_sense_with_hybrid_maps_matches_sigpy_maps(monkeypatch):
    from reconq.recon import senserecon
    from reconq.recon.kspace import CartesianEncoding, KspaceBuffer

    scan = synthetic_scan(matrix=(40, 32), ncoil=12, nz=24, fov_mm=(200.0, 160.0, 96.0),
                          acceleration=(2, 2), acs_lines=(16, 16))
    buffer = KspaceBuffer(CartesianEncoding.from_header(scan.header))
    buffer.add(*_heads_and_data(scan))
    key = buffer.volume_keys()[0]
    opts = senserecon.SenseOptions(batch=8, lamda=1e-3)
    fast = np.abs(senserecon.sense_volume(buffer, key, scan.header, opts))
    original = senserecon.calibration_maps
    monkeypatch.setattr(senserecon, "calibration_maps", lambda *a, **k: original(*a, espirit="sigpy"))
    ref = np.abs(senserecon.sense_volume(buffer, key, scan.header, opts))
    assert nrmse(fast, ref) < 1e-3
    assert nrmse(fast, scan.truth) < nrmse(ref, scan.truth) + 1e-3
