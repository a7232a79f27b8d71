"""Images fitted to a retrieval scan's recon matrix and FOV: geometry in patient coordinates, values, meta."""

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from reconq.recon import fft
from reconq.recon.errors import ReconError
from reconq.recon.geometry import Grid
from reconq.recon.rawdata import RawScan
from reconq.recon.refit import axis_map, fit_images
from reconq.recon.registry import get_pipeline
from reconq.recon.simulate import synthetic_scan, write_mrd

ROTATION = Rotation.from_euler("xyz", [25, -15, 30], degrees=True).as_matrix()
READ, PHASE, SLICE = ROTATION.T  # double-oblique directions
CENTRE = np.array([12.0, -20.0, 35.0])
NEW_UID = 4242
META = {"DataRole": "Image", "WindowCenter": "2000", "WindowWidth": "4000", "Keep_image_geometry": "1",
        "ImageProcessingHistory": ["RECONQ", "cartesian"]}


def grid(image) -> Grid:
    """The image's pixel grid in patient coordinates (MRD: ``position`` is pixel ``n // 2``)."""
    _, nz, ny, nx = image.data.shape
    fx, fy, fz = image.field_of_view[:]
    dirs = [image.read_dir[:], image.phase_dir[:], image.slice_dir[:]]
    return Grid.make(image.position[:], dirs, (fx / nx, fy / ny, fz), (nz, ny, nx))


def make_image(matrix, fov, draw, slice_fov=4.0, nz=1, channels=1):
    """A uint16 magnitude image, ``matrix`` ``(ny, nx)``, ``fov`` ``(x, y)`` mm, double oblique about
    CENTRE; ``draw(points)`` gives the magnitude at patient coordinates ``(ny, nx, 3)``."""
    ny, nx = matrix
    image = ismrmrd.Image.from_array(
        np.zeros((channels, nz, ny, nx), np.uint16), transpose=False, image_type=ismrmrd.IMTYPE_MAGNITUDE,
        field_of_view=(fov[0], fov[1], slice_fov), position=tuple(CENTRE), read_dir=tuple(READ),
        phase_dir=tuple(PHASE), slice_dir=tuple(SLICE), patient_table_position=(0.0, 0.0, -1200.0),
        slice=2, measurement_uid=101, image_index=3, image_series_index=1)
    image.data[:] = np.rint(draw(grid(image).points()[0])).astype(np.uint16)
    image.meta = ismrmrd.Meta(META)
    return image


def retrieval_header(matrix, fov) -> xsd.ismrmrdHeader:
    """A retrieval scan's header whose recon space is ``matrix`` ``(nx, ny)`` over ``fov`` ``(x, y)`` mm."""
    space = xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=matrix[0], y=matrix[1], z=1),
                                  fieldOfView_mm=xsd.fieldOfViewMm(x=fov[0], y=fov[1], z=5.0))
    encoding = xsd.encodingType(encodedSpace=space, reconSpace=space, encodingLimits=xsd.encodingLimitsType(),
                                trajectory=xsd.trajectoryType.CARTESIAN)
    conditions = xsd.experimentalConditionsType(H1resonanceFrequency_Hz=123_200_000)
    return xsd.ismrmrdHeader(experimentalConditions=conditions, encoding=[encoding])


def in_plane_error(image, points, target):
    """``(|error along read| / dx, |error along phase| / dy)`` of ``points`` ``(..., 3)`` from ``target``."""
    fx, fy, _ = image.field_of_view[:]
    ny, nx = image.data.shape[-2:]
    error = np.asarray(points) - target
    return abs(error @ READ) / (fx / nx), abs(error @ PHASE) / (fy / ny)


# ((ny, nx), (fov x, fov y)) in -> out: matrix only, FOV only (same pixels), both, odd and non-square.
CASES = {
    "matrix 128->192": (((128, 128), (220.0, 220.0)), ((192, 192), (220.0, 220.0))),
    "matrix 192->128": (((192, 192), (220.0, 220.0)), ((128, 128), (220.0, 220.0))),
    "fov 220->250 padded": (((176, 176), (220.0, 220.0)), ((200, 200), (250.0, 250.0))),
    "fov 250->200 cropped": (((200, 200), (250.0, 250.0)), ((160, 160), (200.0, 200.0))),
    "both 192@220->256@250": (((192, 192), (220.0, 220.0)), ((256, 256), (250.0, 250.0))),
    "both 128@250->96@200": (((128, 128), (250.0, 250.0)), ((96, 96), (200.0, 200.0))),
    "odd, non-square": (((96, 128), (220.0, 165.0)), ((75, 101), (190.0, 171.0))),
}


@pytest.mark.parametrize("case", CASES)
def test_bright_pixel_stays_at_its_patient_coordinate(case):
    (matrix, fov), (out_matrix, out_fov) = CASES[case]
    row, col = matrix[0] // 2 - 18, matrix[1] // 2 + 22  # off centre, inside every output FOV, no ties
    image = make_image(matrix, fov, lambda points: np.zeros(points.shape[:-1]))
    image.data[0, 0, row, col] = 4095
    point = grid(image).points()[0, row, col]

    (fitted,), description = fit_images([image], retrieval_header(out_matrix[::-1], out_fov), NEW_UID)

    data = fitted.data[0, 0]
    peak = np.unravel_index(np.argmax(data), data.shape)
    assert max(in_plane_error(fitted, grid(fitted).points()[0][peak], point)) <= 0.5
    assert fitted.data.shape == (1, 1, *out_matrix)
    assert fitted.matrix_size == (out_matrix[1], out_matrix[0], 1)
    np.testing.assert_allclose(fitted.field_of_view[:], (*out_fov, 4.0), rtol=1e-6)
    assert fitted.data.dtype == np.uint16 and 0 < data.max() <= 4095
    assert fitted.measurement_uid == NEW_UID
    for field in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position"):
        assert getattr(fitted, field)[:] == getattr(image, field)[:]
    assert (fitted.slice, fitted.image_index, fitted.image_series_index, fitted.image_type) == (2, 3, 1, 1)
    assert dict(ismrmrd.Image.from_bytes(fitted.to_bytes()).meta) == META  # as the scanner receives it
    assert description.startswith(f"images {matrix[1]}x{matrix[0]} at ")
    assert f"the retrieval scan's {out_matrix[1]}x{out_matrix[0]} at " in description


def gaussian(centre, sigma_mm, amplitude=4000.0):
    return lambda points: amplitude * np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2 * sigma_mm**2))


@pytest.mark.parametrize("case", CASES)
def test_blob_centroid_is_kept_to_a_fraction_of_a_pixel(case):
    """A Gaussian blob off the pixel centres keeps its centroid: no half-pixel shift of the grid."""
    (matrix, fov), (out_matrix, out_fov) = CASES[case]
    blob = CENTRE + 31.3 * READ - 18.7 * PHASE
    image = make_image(matrix, fov, gaussian(blob, sigma_mm=4.0))

    (fitted,), _ = fit_images([image], retrieval_header(out_matrix[::-1], out_fov), NEW_UID)

    data = fitted.data[0, 0].astype(np.float64)
    centroid = np.tensordot(data, grid(fitted).points()[0], axes=2) / data.sum()
    assert max(in_plane_error(fitted, centroid, blob)) < 0.02


@pytest.mark.parametrize(("n", "m"), [(128, 192), (192, 128), (63, 96), (96, 63), (64, 65)])
def test_resampling_is_centred_fft_zero_fill(n, m):
    """Where the output FOV equals the input's, the map is: centred FFT, crop or zero-pad k-space,
    inverse FFT, real part (unitary FFTs: times sqrt(m / n) to keep intensities)."""
    x = np.random.default_rng(0).random(n)
    ksp, out = fft.fft(x, axes=(0,)), np.zeros(m, np.complex128)
    if m > n:
        out[m // 2 - n // 2:m // 2 - n // 2 + n] = ksp
    else:
        out = ksp[n // 2 - m // 2:n // 2 - m // 2 + m]
    expected = np.real(fft.ifft(out, axes=(0,))) * np.sqrt(m / n)
    np.testing.assert_allclose(axis_map(n, 220.0 / n, m, 220.0 / m) @ x, expected, atol=1e-12)


@pytest.mark.parametrize(("n", "m"), [(8, 12), (9, 4), (8, 8)])
def test_same_pixels_crop_or_pad_about_pixel_n_over_2(n, m):
    mapped = axis_map(n, 1.25, m, 1.25) @ np.arange(1.0, n + 1)
    offsets = np.arange(m) - m // 2 + n // 2
    np.testing.assert_array_equal(mapped, np.where((offsets >= 0) & (offsets < n), offsets + 1.0, 0.0))


def test_uniform_image_keeps_its_value_inside_and_zeros_outside():
    """A constant stays constant (the k-space scaling keeps intensities) where the input has pixels,
    and is zero where the output FOV reaches beyond them (x: 220 -> 250 mm); y is cropped (220 -> 200)."""
    image = make_image((128, 128), (220.0, 220.0), lambda points: np.full(points.shape[:-1], 3000.0))
    (fitted,), description = fit_images([image], retrieval_header((200, 180), (250.0, 200.0)), NEW_UID)
    assert description.endswith(": resampled in k-space, cropped and zero-padded")
    across = (grid(fitted).points()[0] - CENTRE) @ READ  # (ny, nx) mm from the centre along x
    d = 220.0 / 128
    assert fitted.data.dtype == np.uint16 and fitted.data.max() <= 3000  # ringing clipped, not wrapped
    np.testing.assert_allclose(fitted.data[0, 0][np.abs(across) < 110 - d], 3000, atol=1)
    assert not fitted.data[0, 0][np.abs(across) > 110 + d].any()


def test_same_matrix_and_fov_leaves_data_unchanged():
    image = make_image((96, 128), (220.0, 165.0), gaussian(CENTRE, 20.0))
    (fitted,), description = fit_images([image], retrieval_header((128, 96), (220.0, 165.0)), NEW_UID)
    np.testing.assert_array_equal(fitted.data, image.data)
    assert fitted.measurement_uid == NEW_UID and image.measurement_uid == 101  # the input is not touched
    fitted.measurement_uid = 101
    assert fitted == image  # header, data and meta
    assert description == "unchanged: the retrieval scan's matrix and FOV match"


def test_each_plane_and_channel_is_fitted_alone():
    planes = make_image((32, 40), (200.0, 160.0), gaussian(CENTRE + 20 * READ, 10.0), nz=3, channels=2)
    planes.data[:] = planes.data * np.arange(1, 7, dtype=np.uint16).reshape(2, 3, 1, 1) // 6
    header = retrieval_header((50, 30), (210.0, 150.0))
    (fitted,), _ = fit_images([planes], header, NEW_UID)
    assert fitted.matrix_size == (50, 30, 3) and fitted.data.shape == (2, 3, 30, 50)
    singles = [make_image((32, 40), (200.0, 160.0), lambda p, plane=plane: plane)
               for plane in planes.data.reshape(6, 32, 40)]
    alone, _ = fit_images(singles, header, NEW_UID)  # one value range for all, as for the planes
    np.testing.assert_array_equal(fitted.data.reshape(6, 30, 50), np.stack([a.data[0, 0] for a in alone]))


def test_marker_of_a_reconstructed_3d_scan(tmp_path):
    """Cartesian recon of a double-oblique 3D scan, fitted partition by partition: the marker stays put."""
    point = CENTRE + 24.0 * READ - 28.0 * PHASE + 12.0 * SLICE
    scan = synthetic_scan(matrix=(48, 40), ncoil=4, nz=16, fov_mm=(160.0, 192.0, 64.0), rotation=ROTATION,
                          position=tuple(CENTRE), markers=[(tuple(point), 3.0)])
    with RawScan.open(write_mrd(scan, tmp_path / "raw.h5")) as raw:
        images = get_pipeline("cartesian").run(raw, {}, lambda fraction, stage: None)

    fitted, description = fit_images(images, retrieval_header((64, 52), (176.0, 182.0)), NEW_UID)

    assert "resampled in k-space" in description and len(fitted) == 16
    for before, after in zip(images, fitted, strict=True):
        assert after.position[:] == before.position[:] and after.slice_dir[:] == before.slice_dir[:]
        np.testing.assert_allclose(after.field_of_view[:], (176.0, 182.0, 4.0), rtol=1e-6)
        assert after.meta == before.meta and after.measurement_uid == NEW_UID
    data = np.stack([image.data[0, 0] for image in fitted])
    p, row, col = np.unravel_index(np.argmax(data), data.shape)
    assert max(in_plane_error(fitted[p], grid(fitted[p]).points()[0, row, col], point)) <= 0.5
    assert abs((grid(fitted[p]).points()[0, row, col] - point) @ SLICE) < 1e-3


def test_description_names_sizes_and_steps():
    image = make_image((192, 192), (250.0, 250.0), gaussian(CENTRE, 20.0))
    _, description = fit_images([image], retrieval_header((256, 256), (250.0, 250.0)), NEW_UID)
    assert description == ("images 192x192 at 1.30 mm (250x250 mm) fitted to the retrieval scan's "
                           "256x256 at 0.98 mm (250x250 mm): resampled in k-space")
    _, description = fit_images([image], retrieval_header((160, 160), (208.333, 208.333)), NEW_UID)
    assert description.endswith(": cropped")


def test_header_without_recon_space_is_refused():
    header = retrieval_header((64, 64), (200.0, 200.0))
    header.encoding[0].reconSpace = None
    with pytest.raises(ReconError, match="reconSpace"):
        fit_images([make_image((64, 64), (200.0, 200.0), gaussian(CENTRE, 20.0))], header, NEW_UID)
    with pytest.raises(ReconError, match="reconSpace"):
        header.encoding = []
        fit_images([], header, NEW_UID)


@pytest.mark.parametrize(("matrix", "fov"), [((0, 64), (200.0, 200.0)), ((64, 64), (200.0, -1.0)),
                                             ((64, 64), (0.0, 200.0))])
def test_non_positive_sizes_are_refused(matrix, fov):
    image = make_image((64, 64), (200.0, 200.0), gaussian(CENTRE, 20.0))
    with pytest.raises(ReconError, match="positive"):
        fit_images([image], retrieval_header(matrix, fov), NEW_UID)


@pytest.mark.parametrize("uid", [-1, 2**32, None])
def test_measurement_uid_must_fit_the_header(uid):
    with pytest.raises(ReconError, match="measurement_uid"):
        fit_images([], retrieval_header((64, 64), (200.0, 200.0)), uid)
