"""Images in the scanner's conventions: geometry, matrix, uint16 scaling and meta."""

import ismrmrd
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from reconq.recon.rawdata import RawScan
from reconq.recon.registry import get_pipeline
from reconq.recon.simulate import synthetic_scan, write_mrd

META_KEYS = {"DataRole", "WindowCenter", "WindowWidth", "SequenceDescriptionAdditional",
             "ImageProcessingHistory", "Keep_image_geometry", "ImageRowDir", "ImageColumnDir"}


def run_cartesian(scan, tmp_path):
    with RawScan.open(write_mrd(scan, tmp_path / "raw.h5")) as raw:
        return get_pipeline("cartesian").run(raw, {}, lambda fraction, stage: None)


def test_oblique_2d_geometry(tmp_path):
    rotation = Rotation.from_euler("xyz", [20, -35, 10], degrees=True).as_matrix()
    scan = synthetic_scan(matrix=(24, 40), ncoil=2, nslices=3, rotation=rotation, position=(10.0, -5.0, 30.0),
                          fov_mm=(220.0, 132.0, 4.0), slice_gap=1.0)
    images = run_cartesian(scan, tmp_path)
    recon = scan.header.encoding[0].reconSpace
    for image in images:
        acq = next(a for a in scan.acquisitions if a.idx.slice == image.slice)
        for field in ("read_dir", "phase_dir", "slice_dir", "patient_table_position", "position"):
            np.testing.assert_allclose(getattr(image, field)[:], getattr(acq, field)[:], atol=1e-6)
        centre = np.add((10.0, -5.0, 30.0), (image.slice - 1) * 5.0 * np.asarray(acq.slice_dir[:]))
        np.testing.assert_allclose(image.position[:], centre, atol=1e-4)
        np.testing.assert_allclose(image.field_of_view[:], (220.0, 132.0, 4.0))
        assert image.matrix_size == (recon.matrixSize.x, recon.matrixSize.y, 1) == (40, 24, 1)
        assert image.data.shape == (1, 1, 24, 40)
        assert image.measurement_uid == 101
    assert [image.image_index for image in images] == [1, 2, 3]
    assert {image.image_series_index for image in images} == {1}


def test_3d_partition_geometry(tmp_path):
    rotation = Rotation.from_euler("y", 30, degrees=True).as_matrix()
    scan = synthetic_scan(matrix=(16, 16), ncoil=2, nz=8, rotation=rotation, position=(0.0, 5.0, 0.0),
                          fov_mm=(128.0, 128.0, 48.0))
    images = run_cartesian(scan, tmp_path)
    slice_dir = np.asarray(scan.acquisitions[0].slice_dir[:])
    for p, image in enumerate(images):
        np.testing.assert_allclose(image.position[:], np.add((0.0, 5.0, 0.0), (p - 4) * 6.0 * slice_dir),
                                   atol=1e-4)
        np.testing.assert_allclose(image.field_of_view[:], (128.0, 128.0, 6.0))
        np.testing.assert_allclose(image.slice_dir[:], slice_dir, atol=1e-6)


@pytest.mark.parametrize("bits", [None, 16])
def test_uint16_scaled_to_bits_stored(tmp_path, bits):
    scan = synthetic_scan(matrix=(16, 16), ncoil=2, nslices=2, bits_stored=bits)
    images = run_cartesian(scan, tmp_path)
    data = np.stack([image.data for image in images])
    assert data.dtype == np.uint16
    assert data.max() == 2 ** (bits or 12) - 1


def test_meta_keys(tmp_path):
    images = run_cartesian(synthetic_scan(matrix=(16, 16), ncoil=2), tmp_path)
    meta = ismrmrd.Image.from_bytes(images[0].to_bytes()).meta  # as the scanner receives it
    assert set(meta) >= META_KEYS
    assert meta["DataRole"] == "Image" and meta["Keep_image_geometry"] == "1"
    assert meta["SequenceDescriptionAdditional"] == "cartesian"
    assert [float(v) for v in meta["ImageRowDir"]] == [1.0, 0.0, 0.0]
    assert [float(v) for v in meta["ImageColumnDir"]] == [0.0, 1.0, 0.0]
    assert int(meta["WindowWidth"]) > 0
    assert images[0].image_type == 1  # ismrmrd.IMTYPE_MAGNITUDE


def pixel_to_patient(image, row, col):
    """Patient coordinate (mm) of a pixel centre: position + offsets along the row and column directions."""
    ny, nx = image.data.shape[-2:]
    dx, dy = image.field_of_view[0] / nx, image.field_of_view[1] / ny
    return (np.asarray(image.position[:]) + (col - nx // 2) * dx * np.asarray(image.read_dir[:])
            + (row - ny // 2) * dy * np.asarray(image.phase_dir[:]))


@pytest.mark.parametrize("pipeline", ["cartesian", "sense"])
def test_point_appears_at_its_patient_coordinate_double_oblique_3d(tmp_path, pipeline):
    rotation = Rotation.from_euler("xyz", [25, -15, 30], degrees=True).as_matrix()
    centre = np.array([12.0, -20.0, 35.0])
    read, phase, slc = rotation.T  # the rotated axial directions
    point = centre + 24.0 * read - 28.0 * phase + 12.0 * slc  # on voxel centres: 4 mm voxels
    scan = synthetic_scan(matrix=(48, 40), ncoil=8, nz=16, fov_mm=(160.0, 192.0, 64.0), rotation=rotation,
                          position=tuple(centre), acceleration=(2, 2) if pipeline == "sense" else (1, 1),
                          acs_lines=(16, 12), markers=[(tuple(point), 3.0)])
    with RawScan.open(write_mrd(scan, tmp_path / "raw.h5")) as raw:
        images = get_pipeline(pipeline).run(raw, {"lowres": 24}, lambda fraction, stage: None)
    assert len(images) == 16
    for p, image in enumerate(images):  # geometry agrees with the acquisition's
        np.testing.assert_allclose(image.read_dir[:], read, atol=1e-6)
        np.testing.assert_allclose(image.phase_dir[:], phase, atol=1e-6)
        np.testing.assert_allclose(image.slice_dir[:], slc, atol=1e-6)
        np.testing.assert_allclose(image.position[:], centre + (p - 8) * 4.0 * slc, atol=1e-4)
        np.testing.assert_allclose(image.field_of_view[:], (160.0, 192.0, 4.0))
    data = np.stack([image.data[0, 0] for image in images])
    p, row, col = np.unravel_index(np.argmax(data), data.shape)
    np.testing.assert_allclose(pixel_to_patient(images[p], row, col), point, atol=1e-3)
