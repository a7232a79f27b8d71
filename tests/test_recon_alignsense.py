"""The ``alignsense`` pipeline on raw MRD files: shots from the raw data, motion corrected against plain
SENSE, the motion table and meta, the sequential order refused with a warning, and its estimates.

The scans move rigidly between shots by a route independent of the solver: each shot's lines are the
analytic k-space of the phantom moved analytically (:mod:`reconq.recon.shotsim`). Coil maps come from a
calibration block acquired in one go, as a separate calibration is."""

from __future__ import annotations

import ismrmrd
import numpy as np
import pytest

from reconq.recon.errors import ReconError
from reconq.recon.phantoms import Phantom
from reconq.recon.rawdata import RawScan
from reconq.recon.registry import get_pipeline
from reconq.recon.shotsim import moving_scan
from reconq.recon.simulate import SyntheticScan, write_mrd

SHAPE = (64, 64)
FOV = 220.0
#: per shot (ty, tx, rotation): voxels and degrees, mean zero (the image comes back in the mean position)
MOTION = np.array([[0, 0, 0], [1.5, -2.0, 3.0], [-1.0, 1.0, -2.0], [2.0, 0.5, 4.0]]) - [0.625, -0.125, 1.25]


class Progress:
    """What the worker's progress object takes: progress, warnings and the report."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.reported: dict = {}

    def __call__(self, fraction: float, stage: str) -> None:
        assert 0.0 <= fraction <= 1.0

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def report(self, name: str, value) -> None:
        self.reported[name] = value


def nrmse(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    scale = float(got @ want) / float(got @ got)
    return float(np.linalg.norm(scale * got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return Phantom.default(2, ncoil=8, seed=1).resized(0.7).blurred(1.5, SHAPE)


def run(tmp_path, phantom, params=None, echo_train: bool = True, **kwargs):
    scan = moving_scan(phantom, SHAPE, MOTION, fov_mm=(FOV, FOV, 5.0), **kwargs)
    if not echo_train:
        scan.header.encoding[0].echoTrainLength = None
    path = write_mrd(scan, tmp_path / "m.h5")
    progress = Progress()
    with RawScan.open(path) as raw:
        images = get_pipeline("alignsense").run(raw, params or {}, progress)
    return scan, images, progress


def estimated(progress: Progress) -> np.ndarray:
    """The motion table back in voxels and degrees: (ty, tx, rotation) per shot."""
    voxel = FOV / SHAPE[0]
    return np.array([[row[3] / voxel, row[2] / voxel, row[7]] for row in progress.reported["motion"]["rows"]])


@pytest.mark.parametrize("order", ["random", "interleaved"])
def test_motion_is_corrected_far_beyond_plain_sense(tmp_path, phantom, order):
    scan, images, progress = run(tmp_path, phantom, {"compare": True}, order=order)
    corrected = [i for i in images if i.image_series_index == 1]
    plain = [i for i in images if i.image_series_index == 2]
    assert len(corrected) == len(plain) == 1  # the uncorrected SENSE images as a second series
    good = nrmse(np.asarray(corrected[0].data)[0, 0], scan.truth)
    bad = nrmse(np.asarray(plain[0].data)[0, 0], scan.truth)
    assert good < 0.03 and bad > 10 * good  # measured 0.008 against 0.16-0.18
    err = np.abs(estimated(progress) - MOTION).max(axis=0)
    assert err[0] < 0.1 and err[1] < 0.1 and err[2] < 0.3  # voxels, voxels, degrees; measured 0.04, 0.04, 0.17
    assert not progress.warnings
    table = progress.reported["motion"]
    assert table["columns"][2:5] == ["read mm", "phase mm", "slice mm"] and len(table["rows"]) == 4
    meta = ismrmrd.Meta.deserialize(corrected[0].attribute_string)
    assert len(meta["ReconQMotion"]) == 4 and "read_mm" in meta["ReconQMotionUnits"]


@pytest.mark.parametrize("how", ["echo train length", "shots parameter"])
def test_shots_without_segments_come_from_the_echo_train_or_the_parameter(tmp_path, phantom, how):
    """Without ``idx.segment``, shots are consecutive blocks in acquisition order (the simulator
    acquires shot after shot), of the echo train length or of the number of shots asked for."""
    params = {"shots": 4} if how == "shots parameter" else {}
    scan, images, progress = run(tmp_path, phantom, params, echo_train=how != "shots parameter", order="random",
                                 segments=False)
    assert len(progress.reported["motion"]["rows"]) == 4
    assert np.abs(estimated(progress) - MOTION).max() < 0.3
    assert nrmse(np.asarray(images[0].data)[0, 0], scan.truth) < 0.03


def test_a_sequential_order_gets_a_warning_and_plain_sense(tmp_path, phantom):
    scan, images, progress = run(tmp_path, phantom, order="sequential")
    assert len(images) == 1
    assert progress.warnings and "motion not corrected" in progress.warnings[0]
    assert "sequential" in progress.warnings[0]
    assert "motion" not in progress.reported


def test_no_shots_in_the_data_is_refused(tmp_path, phantom):
    scan = moving_scan(phantom, SHAPE, MOTION, segments=False)
    scan.header.encoding[0].echoTrainLength = None
    path = write_mrd(scan, tmp_path / "m.h5")
    with RawScan.open(path) as raw, pytest.raises(ReconError, match="alignsense needs the shots"):
        get_pipeline("alignsense").run(raw, {}, lambda f, s: None)
    with RawScan.open(path) as raw, pytest.raises(ReconError, match="shots=0"):
        get_pipeline("alignsense").run(raw, {"shots": 0}, lambda f, s: None)


def test_bad_solver_options_are_refused(tmp_path, phantom):
    scan = moving_scan(phantom, SHAPE, MOTION)
    path = write_mrd(scan, tmp_path / "m.h5")
    with RawScan.open(path) as raw, pytest.raises(ReconError, match=r"AlignOptions.levels must be increasing"):
        get_pipeline("alignsense").run(raw, {"levels": [0.5, 0.25]}, lambda f, s: None)


def test_the_memory_and_time_models_grow_with_coils_and_shots(phantom):
    scan = moving_scan(phantom, SHAPE, MOTION)
    pipeline = get_pipeline("alignsense")
    base = pipeline.memory_estimate(scan.header, {})
    assert pipeline.memory_estimate(scan.header, {"shots": 16}) > base
    assert 0 < pipeline.runtime_estimate(scan.header, {}) < pipeline.runtime_estimate(scan.header, {"shots": 16})
    scan.header.acquisitionSystemInformation.receiverChannels = 32
    assert pipeline.memory_estimate(scan.header, {}) > base


def test_a_reference_with_a_larger_fov_unfolds_the_scan_at_that_fov(tmp_path):
    """The scan's phase FOV (100 mm) is half the object; the reference scan covers 200 mm. Asked for the
    reference's FOV, the images are 64 rows over 200 mm, unfolded by the reference's maps; at the scan's
    own FOV they are folded. One object for both: k-space in the reference's FOV fractions, the scan's
    lines every other one of it (same resolution)."""
    from reconq.recon.shotsim import _header, _readout

    obj = Phantom.default(2, ncoil=8, seed=4).resized(0.7).blurred(1.5, (64, 64))
    reference = moving_scan(obj, (64, 64), np.zeros((1, 3)), fov_mm=(200.0, 200.0, 5.0), segments=False,
                            calibration=0, protocol="ref")
    ref_path = write_mrd(reference, tmp_path / "ref.h5")
    rows = np.arange(32)  # the scan: 32 lines over 100 mm, 4 interleaved shots, no motion
    grid = np.stack(np.meshgrid(2 * (rows - 16), np.arange(64) - 32, indexing="ij"), -1)  # reference cycles
    ksp = obj.kspace(grid)  # (ncoil, 32, 64)
    acqs = []
    for shot in range(4):
        for line in rows[shot::4]:
            acq = _readout(ksp[:, line], (32, 64), int(line), (0.0, 0.0, 0.0), 0.0, None)
            acq.idx.segment = shot
            acqs.append(acq)
    scan = SyntheticScan(header=_header((32, 64), 8, (200.0, 100.0, 5.0), 4, 8, "FOV01", "1.2.3", "small_fov",
                                        "66001_1_2_3"), acquisitions=acqs, truth=obj.truth((64, 64)),
                         mps=np.zeros((0,), np.complex64))
    path = write_mrd(scan, tmp_path / "scan.h5")
    progress = Progress()
    with RawScan.open(path) as raw:
        wide = get_pipeline("alignsense").run(raw, {"reference": str(ref_path), "fov": "reference"}, progress)
        folded = get_pipeline("alignsense").run(raw, {"reference": str(ref_path)}, Progress())
    image = np.asarray(wide[0].data)[0, 0]
    assert image.shape == (64, 64)
    np.testing.assert_allclose(wide[0].field_of_view, (200.0, 200.0, 5.0), atol=1e-4)
    assert nrmse(image, scan.truth) < 0.1  # unfolded: measured 0.068
    assert np.asarray(folded[0].data)[0, 0].shape == (32, 64)
    centre = scan.truth[16:48]  # the folded image's rows hold the centre plus the folded edges
    assert nrmse(np.asarray(folded[0].data)[0, 0], centre) > 0.2  # measured 0.25
    assert np.abs(estimated_from(progress)).max() < 0.3  # nothing moved: measured 0.16 mm, 0.08 deg


def estimated_from(progress: Progress) -> np.ndarray:
    return np.array([row[2:] for row in progress.reported["motion"]["rows"]], dtype=np.float64)


def test_fov_reference_without_a_reference_is_refused(tmp_path, phantom):
    scan = moving_scan(phantom, SHAPE, MOTION)
    path = write_mrd(scan, tmp_path / "m.h5")
    with RawScan.open(path) as raw, pytest.raises(ReconError, match="fov=reference needs a reference scan"):
        get_pipeline("alignsense").run(raw, {"fov": "reference"}, lambda f, s: None)


def test_voxels_that_are_not_isotropic_get_a_warning_and_plain_sense(tmp_path, phantom):
    """The rigid model rotates voxel coordinates: 220 x 110 mm over 64 x 64 makes 3.4 x 1.7 mm voxels."""
    scan = moving_scan(phantom, SHAPE, MOTION, fov_mm=(FOV, FOV / 2, 5.0))
    path = write_mrd(scan, tmp_path / "m.h5")
    progress = Progress()
    with RawScan.open(path) as raw:
        images = get_pipeline("alignsense").run(raw, {}, progress)
    assert len(images) == 1 and "motion" not in progress.reported
    assert "the rigid model needs them equal" in progress.warnings[0]
