"""The ``radial`` pipeline on raw MRD files: trajectory units and ranges, volumes and echoes, geometry,
bad data refused with a reason, and the memory model placement reads."""

from __future__ import annotations

import copy

import ismrmrd
import numpy as np
import pytest

from reconq.recon import radial
from reconq.recon.errors import ReconError
from reconq.recon.phantoms import Phantom
from reconq.recon.radialdata import RadialEncoding
from reconq.recon.radialsim import radial_scan
from reconq.recon.rawdata import RawScan
from reconq.recon.registry import get_pipeline
from reconq.recon.simulate import write_mrd


def nrmse(got: np.ndarray, want: np.ndarray) -> float:
    """Normalised RMS error after the least-squares scale (images are scaled to the uint16 range)."""
    got, want = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    scale = float(got @ want) / float(got @ got)
    return float(np.linalg.norm(scale * got - want) / np.linalg.norm(want))


def run(path, params=None):
    with RawScan.open(path) as scan:
        return get_pipeline("radial").run(scan, params or {}, lambda f, s: None)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(img.data)[0, 0].astype(np.float32) for img in images])


@pytest.fixture(scope="module")
def phantom2d() -> Phantom:
    return Phantom.default(2, ncoil=4, seed=3)


def scan_2d(phantom: Phantom, n: int = 64, **kwargs):
    coord = radial.radial_2d(int(np.pi / 2 * n), 2 * n, n / 2)
    return radial_scan(coord, lambda c, e: phantom.kspace(c, te_ms=0.0), ncoil=phantom.ncoil, matrix=(n, n, 1),
                       fov_mm=(220.0, 220.0, 5.0), kind="2d", **kwargs), coord


@pytest.mark.parametrize("units", ["normalised", "cycles_per_fov"])
def test_a_2d_radial_scan_is_reconstructed_in_either_unit(tmp_path, phantom2d, units):
    scan, _ = scan_2d(phantom2d, units=units)
    images = run(write_mrd(scan, tmp_path / "r.h5"), {"niter": 5})
    assert len(images) == 1
    truth = phantom2d.truth((64, 64))  # the band-limited image of a fully sampled Cartesian scan
    assert nrmse(pixels(images)[0], truth) < 0.05  # measured 0.023
    assert images[0].data_type == ismrmrd.DATATYPE_USHORT


def test_units_the_header_does_not_know_are_refused(tmp_path, phantom2d):
    scan, _ = scan_2d(phantom2d)
    scan.header.encoding[0].trajectoryDescription.userParameterString[0].value = "radians_per_m"
    with pytest.raises(ReconError, match="units='radians_per_m' is not known"):
        run(write_mrd(scan, tmp_path / "r.h5"))


def test_a_trajectory_outside_the_stated_range_is_refused(tmp_path, phantom2d):
    """Cycles per FOV sent under the default normalised units reach ±32, far outside ±0.5."""
    scan, _ = scan_2d(phantom2d, units="cycles_per_fov")
    scan.header.encoding[0].trajectoryDescription.userParameterString = []
    with pytest.raises(ReconError, match=r"outside ±0.5 \(normalised"):
        run(write_mrd(scan, tmp_path / "r.h5"))


def test_readouts_without_a_trajectory_and_no_sequence_are_refused(tmp_path, phantom2d):
    scan, _ = scan_2d(phantom2d, with_trajectory=False)
    with pytest.raises(ReconError, match="no trajectory .* names no Pulseq sequence"):
        run(write_mrd(scan, tmp_path / "r.h5"))


def test_samples_that_are_not_finite_are_refused(tmp_path, phantom2d):
    scan, _ = scan_2d(phantom2d)
    scan.acquisitions[10].data[0, 3] = np.nan
    with pytest.raises(ReconError, match="readout 10 holds samples that are not finite"):
        run(write_mrd(scan, tmp_path / "r.h5"))


def test_a_channel_count_that_changes_is_refused(tmp_path, phantom2d):
    scan, _ = scan_2d(phantom2d)
    odd = scan.acquisitions[5]
    scan.acquisitions[5] = ismrmrd.Acquisition.from_array(odd.data[:3], odd.traj)
    scan.acquisitions[5].idx.kspace_encode_step_1 = 5
    with pytest.raises(ReconError, match="readout 5 has 3 channels, earlier ones 4"):
        run(write_mrd(scan, tmp_path / "r.h5"))


def test_cartesian_scans_are_refused_with_the_pipelines_to_use(tmp_path):
    from reconq.recon.simulate import synthetic_scan

    scan = synthetic_scan(matrix=(16, 16), ncoil=2)
    with pytest.raises(ReconError, match="use cartesian or sense"):
        run(write_mrd(scan, tmp_path / "c.h5"))


def test_bad_options_are_refused(tmp_path, phantom2d):
    scan, _ = scan_2d(phantom2d, n=32)
    path = write_mrd(scan, tmp_path / "r.h5")
    with pytest.raises(ReconError):
        run(path, {"dcf": "voronoi"})
    with pytest.raises(ReconError, match="invalid radial parameter"):
        run(path, {"niter": "many"})


@pytest.fixture(scope="module")
def kooshball_files(tmp_path_factory):
    """A 3D multi-echo kooshball, oblique and off-centre, Nyquist-sampled at 32³, 4 coils, 2 echoes."""
    n = 32
    phantom = Phantom.default(3, ncoil=4, seed=5)
    coord = radial.kooshball(int(np.pi * n * n / 2), 2 * n, n / 2)
    rotation, _ = np.linalg.qr(np.array([[0.9, -0.3, 0.3], [0.3, 0.95, 0.0], [-0.3, 0.1, 0.95]]))
    te = (2.0, 8.0)
    scan = radial_scan(coord, lambda c, e: phantom.kspace(c, te_ms=te[e]), ncoil=4, matrix=(n, n, n),
                       fov_mm=(192.0, 192.0, 160.0), kind="3d", echoes=2, te_ms=te, rotation=rotation,
                       position=(12.0, -8.0, 30.0), noise_readouts=4)
    path = write_mrd(scan, tmp_path_factory.mktemp("koosh") / "k.h5")
    return path, scan, phantom, te, rotation


def test_a_multi_echo_kooshball_gives_one_image_per_partition_and_echo_with_the_decay(kooshball_files):
    path, scan, phantom, te, rotation = kooshball_files
    images = run(path, {"niter": 5})
    n = 32
    assert len(images) == 2 * n
    by_echo = {e: [img for img in images if img.contrast == e] for e in (0, 1)}
    assert [len(v) for v in by_echo.values()] == [n, n]
    for e in (0, 1):
        got = pixels(sorted(by_echo[e], key=lambda i: i.slice))
        assert nrmse(got, phantom.truth((n, n, n), te_ms=te[e])) < 0.12  # measured 0.098 and 0.054
    # one scale over the series, so the echoes' ratio is the phantom's decay
    ratio = pixels(by_echo[1]).sum() / pixels(by_echo[0]).sum()
    want = phantom.truth((n, n, n), te_ms=te[1]).sum() / phantom.truth((n, n, n), te_ms=te[0]).sum()
    assert ratio == pytest.approx(want, rel=0.03)


def test_kooshball_partitions_lie_along_the_slice_direction(kooshball_files):
    path, scan, phantom, te, rotation = kooshball_files
    images = [img for img in run(path) if img.contrast == 0]
    thickness = 160.0 / 32
    slice_dir = rotation[:, 2]
    for img in images:
        want = np.array([12.0, -8.0, 30.0]) + (img.slice - 16) * thickness * slice_dir
        np.testing.assert_allclose(img.position, want, atol=1e-3)
        np.testing.assert_allclose(img.read_dir, rotation[:, 0], atol=1e-6)
        np.testing.assert_allclose(img.field_of_view, (192.0, 192.0, thickness), atol=1e-4)


def test_the_memory_model_grows_with_the_grid_coils_and_echoes(kooshball_files):
    path, scan, *_ = kooshball_files
    pipeline = get_pipeline("radial")
    small = pipeline.memory_estimate(scan.header, {})
    header = copy.deepcopy(scan.header)
    header.acquisitionSystemInformation.receiverChannels = 32
    assert pipeline.memory_estimate(header, {}) > 7 * (small - 512 * 2**20)
    # a 256³, 32-coil, 2-echo kooshball does not fit a 40 GB GPU
    for axis in ("x", "y", "z"):
        setattr(header.encoding[0].reconSpace.matrixSize, axis, 256)
    assert pipeline.memory_estimate(header, {}) > 40e9


def test_encoding_conversion_to_the_recon_grid():
    """Normalised ±0.5 on a 2x oversampled readout reaches the recon grid's ±N/2, whatever the recon FOV."""
    scan = radial_scan(radial.radial_2d(8, 16, 4.0), lambda c, e: np.ones((1, len(c))), ncoil=1,
                       matrix=(8, 8, 1), fov_mm=(200.0, 200.0, 5.0), kind="2d")
    enc = RadialEncoding.from_header(scan.header)
    got = enc.to_grid(np.array([[0.5, -0.5], [0.25, 0.0]]))
    np.testing.assert_allclose(got, [[-4.0, 4.0], [0.0, 2.0]])  # columns (ky, kx)


@pytest.mark.gpu
def test_the_gpu_path_gives_the_cpu_images(cuda, kooshball_files):
    pytest.importorskip("cufinufft", reason="cufinufft is not installed: GPU test not run")
    path, *_ = kooshball_files
    cpu, gpu = pixels(run(path, {"niter": 3})), pixels(run(path, {"niter": 3, "device": 0}))
    assert nrmse(gpu, cpu) < 1e-3


def test_placement_stores_the_radial_memory_model_on_the_job(tmp_path, settings, store, kooshball_files):
    """At submit, a radial job's estimate is the pipeline's own NUFFT model, not the Cartesian default."""
    from reconq.core.celeryapp import make_celery
    from reconq.core.jobs import Job
    from reconq.core.sender import TaskSender
    from reconq.core.states import JobState
    from reconq.core.storage import ScanStore
    from reconq.scheduler.estimate import default_estimate
    from reconq.scheduler.placement import Placement

    path, scan, *_ = kooshball_files
    scans = ScanStore(settings.data_dir)
    raw = scans.raw_path("radial-scan")
    raw.parent.mkdir(parents=True)
    raw.write_bytes(path.read_bytes())
    job = Job(id="radial-1", scan_id="radial-scan", pipeline="radial", queue="routine", protocol="koosh")
    assert store.create(job) and store.set_state(job.id, JobState.QUEUED)
    Placement(settings, store, scans, TaskSender(make_celery(settings))).place_many([job])
    kept = store.get("radial-1")
    with RawScan.open(path) as stored:
        want = get_pipeline("radial").memory_estimate(stored.header, {})
        assert kept is not None and kept.mem_estimate_bytes == want
        assert want != default_estimate(stored.header, {})


def test_each_slice_of_a_multi_slice_scan_gets_its_own_coil_maps(tmp_path):
    """Two slices on one trajectory are two NUFFT groups: maps of one slice never serve the other."""
    n = 48
    coord = radial.radial_2d(int(np.pi / 2 * n), 2 * n, n / 2)
    phantoms = [Phantom.default(2, ncoil=4, seed=s) for s in (1, 2)]
    phantoms[1] = phantoms[1].moved(np.array([[0.0, 1.0], [-1.0, 0.0]]), (0.05, -0.05))  # another section
    scans = [radial_scan(coord, lambda c, e, p=p: p.kspace(c), ncoil=4, matrix=(n, n, 1),
                         fov_mm=(220.0, 220.0, 5.0), kind="2d") for p in phantoms]
    for acq in scans[1].acquisitions:
        acq.idx.slice = 1
    scans[0].acquisitions[-1].clear_all_flags()
    scans[0].acquisitions += scans[1].acquisitions
    scans[0].header.encoding[0].encodingLimits.slice.maximum = 1
    images = run(write_mrd(scans[0], tmp_path / "two.h5"), {"combine": "maps", "niter": 5})
    assert sorted(img.slice for img in images) == [0, 1]
    for img in images:
        want = phantoms[img.slice]
        truth = np.abs(want.without_coils().truth_coils((n, n))[0])
        assert nrmse(np.asarray(img.data)[0, 0], truth) < 0.1  # measured 0.061, 0.079 (0.34 with slice 0 maps)
