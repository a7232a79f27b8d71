"""Magnitude images in the scanner's conventions: uint16 scaled to BitsStored, geometry, meta.

Image data follow ismrmrd's ``(channels, z, y, x)`` order with x the readout (columns) and y
the phase encode (rows).

References:
    Inati SJ et al. ISMRM Raw data format. Magn Reson Med 2017;77:411-421.
    python-ismrmrd-server (kspaceKelvin), ``invertcontrast.py``: the meta keys the scanner reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np

from reconq.recon.errors import ReconError

Vec3 = tuple[float, float, float]
DEFAULT_BITS_STORED = 12


@dataclass(frozen=True)
class ImageGeometry:
    """Where one 2D image lies and which counters it carries (patient coordinates, mm)."""

    position: Vec3
    read_dir: Vec3
    phase_dir: Vec3
    slice_dir: Vec3
    patient_table_position: Vec3
    slice: int = 0
    contrast: int = 0
    phase: int = 0
    repetition: int = 0
    set: int = 0
    average: int = 0
    measurement_uid: int = 0
    acquisition_time_stamp: int = 0
    physiology_time_stamp: tuple[int, ...] = field(default=(0, 0, 0))

    @classmethod
    def from_head(cls, head: np.void, **overrides) -> ImageGeometry:
        """From an acquisition header (``ismrmrd.hdf5.acquisition_header_dtype``); ``overrides`` win."""
        idx = head["idx"]
        geometry = cls(
            position=_vec(head["position"]), read_dir=_vec(head["read_dir"]),
            phase_dir=_vec(head["phase_dir"]), slice_dir=_vec(head["slice_dir"]),
            patient_table_position=_vec(head["patient_table_position"]),
            slice=int(idx["slice"]), contrast=int(idx["contrast"]), phase=int(idx["phase"]),
            repetition=int(idx["repetition"]), set=int(idx["set"]),
            measurement_uid=int(head["measurement_uid"]),
            acquisition_time_stamp=int(head["acquisition_time_stamp"]),
            physiology_time_stamp=tuple(int(t) for t in head["physiology_time_stamp"]))
        return replace(geometry, **overrides)


def _vec(values) -> Vec3:
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def bits_stored(header: xsd.ismrmrdHeader) -> int:
    """The ``BitsStored`` user parameter (long) of the header, 12 when absent."""
    params = header.userParameters.userParameterLong if header.userParameters else []
    bits = next((int(p.value) for p in params if p.name == "BitsStored"), DEFAULT_BITS_STORED)
    if not 1 <= bits <= 16:
        raise ReconError(f"userParameters BitsStored={bits}: must be 1..16 for uint16 images")
    return bits


def field_of_view(header: xsd.ismrmrdHeader) -> Vec3:
    """Recon-space FOV ``(x, y, z)`` in mm per 2D image: z is the slice thickness (2D) or the
    partition thickness (3D, the slab FOV over the recon ``z`` matrix)."""
    if not header.encoding:
        raise ReconError("header has no encoding (ismrmrdHeader.encoding is empty)")
    space = header.encoding[0].reconSpace
    fov, nz = space.fieldOfView_mm, max(int(space.matrixSize.z or 1), 1)
    return float(fov.x), float(fov.y), float(fov.z) / nz


def to_uint16(mag: np.ndarray, bits: int) -> np.ndarray:
    """Scale so that the maximum maps to ``2**bits - 1``; ``mag`` real, any shape; returns uint16."""
    peak = float(mag.max()) if mag.size else 0.0
    scale = (2**bits - 1) / peak if peak > 0 else 0.0
    return np.clip(np.rint(mag * scale), 0, 2**bits - 1).astype(np.uint16)


def window(scaled: np.ndarray) -> tuple[int, int]:
    """``(centre, width)`` spanning the 0.5th to 99.5th percentile of ``scaled``."""
    lo, hi = np.percentile(scaled, [0.5, 99.5]) if scaled.size else (0.0, 1.0)
    return int(round((lo + hi) / 2)), max(int(round(hi - lo)), 1)


def to_mrd_images(
    mag,
    geometry: Sequence[ImageGeometry],
    header: xsd.ismrmrdHeader,
    series_index: int = 1,
    description: str = "RECONQ",
    history: Sequence[str] = ("RECONQ",),
) -> list[ismrmrd.Image]:
    """Make one MRD magnitude image per 2D image, as one series.

    The whole series shares one scale (its maximum maps to ``2**BitsStored - 1``) and one window.

    Args:
        mag: ``(nimg, ny, nx)`` real magnitude (numpy or cupy), x = readout = columns.
        geometry: ``nimg`` geometries, in image order.
        header: the scan's MRD header (recon-space FOV, BitsStored).
        series_index: ``image_series_index`` of all images.
        description: ``SequenceDescriptionAdditional`` (the pipeline name).
        history: ``ImageProcessingHistory``.

    Returns:
        ``nimg`` uint16 images with ``image_index`` 1..nimg.
    """
    mag = np.asarray(mag.get() if hasattr(mag, "get") else mag)  # a cupy array to the host
    if mag.ndim != 3 or len(geometry) != mag.shape[0]:
        raise ReconError(f"{mag.shape} magnitudes for {len(geometry)} geometries: need (nimg, ny, nx)")
    scaled = to_uint16(mag, bits_stored(header))
    fov = field_of_view(header)
    meta = _series_meta(scaled, description, history)
    return [_image(scaled[i], g, fov, series_index, i + 1, meta) for i, g in enumerate(geometry)]


def _series_meta(scaled: np.ndarray, description: str, history: Sequence[str]) -> dict:
    centre, width = window(scaled)
    return {
        "DataRole": "Image",
        "WindowCenter": str(centre),
        "WindowWidth": str(width),
        "SequenceDescriptionAdditional": description,
        "ImageProcessingHistory": list(history),
        "Keep_image_geometry": "1",
    }


def _image(data: np.ndarray, g: ImageGeometry, fov: Vec3, series_index: int, index: int,
           series_meta: dict) -> ismrmrd.Image:
    image = ismrmrd.Image.from_array(
        data, transpose=False, image_type=ismrmrd.IMTYPE_MAGNITUDE, field_of_view=fov,
        position=g.position, read_dir=g.read_dir, phase_dir=g.phase_dir, slice_dir=g.slice_dir,
        patient_table_position=g.patient_table_position, slice=g.slice, contrast=g.contrast,
        phase=g.phase, repetition=g.repetition, set=g.set, average=g.average, measurement_uid=g.measurement_uid,
        acquisition_time_stamp=g.acquisition_time_stamp, physiology_time_stamp=g.physiology_time_stamp,
        image_index=index, image_series_index=series_index)
    meta = ismrmrd.Meta(series_meta)
    meta["ImageProcessingHistory"] = list(series_meta["ImageProcessingHistory"])
    meta["ImageRowDir"] = [f"{v:.18f}" for v in g.read_dir]
    meta["ImageColumnDir"] = [f"{v:.18f}" for v in g.phase_dir]
    image.meta = meta
    return image
