"""Cartesian reconstruction: k-space buffering from acquisition headers, FFT, sum of squares.

Readouts are placed by ``idx.kspace_encode_step_1/2`` relative to the header's encoding-limit
centres, so the centre line lands at the matrix centre (index ``n // 2``), and along readout by
``center_sample``. 2D multi-slice scans are told apart by ``idx.slice``, 3D scans have an
encoded ``z`` matrix above 1. Averages are averaged; slices, contrasts, phases, repetitions and
sets are reconstructed apart. Readout oversampling is removed and the image cropped to the
header's recon space.

References:
    Inati SJ et al. ISMRM Raw data format. Magn Reson Med 2017;77:411-421.
    Roemer PB et al. The NMR phased array. Magn Reson Med 1990;16:192-225.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import sigpy as sp

from recon import fft
from recon.coils import sos
from recon.errors import ReconError
from recon.images import ImageGeometry

logger = logging.getLogger(__name__)

#: Readouts that carry no imaging data for this recon.
SKIPPED_FLAGS = (
    ismrmrd.ACQ_IS_NOISE_MEASUREMENT,
    ismrmrd.ACQ_IS_PARALLEL_CALIBRATION,
    ismrmrd.ACQ_IS_NAVIGATION_DATA,
    ismrmrd.ACQ_IS_PHASECORR_DATA,
    ismrmrd.ACQ_IS_HPFEEDBACK_DATA,
    ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
    ismrmrd.ACQ_IS_RTFEEDBACK_DATA,
    ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA,
    ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE,
    ismrmrd.ACQ_IS_PHASE_STABILIZATION,
)
_SKIP_MASK = np.uint64(sum(1 << (flag - 1) for flag in SKIPPED_FLAGS))

#: Counters that make separate images: (slice, contrast, phase, repetition, set).
VolumeKey = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class CartesianEncoding:
    """What the recon needs from the header's first encoding.

    Matrices and FOVs are ``(x, y, z)``: x readout, y phase, z partition (1 for 2D).
    """

    enc_matrix: tuple[int, int, int]
    enc_fov: tuple[float, float, float]
    recon_matrix: tuple[int, int, int]
    recon_fov: tuple[float, float, float]
    centre_e1: int
    centre_e2: int

    @property
    def is3d(self) -> bool:
        return self.enc_matrix[2] > 1

    @classmethod
    def from_header(cls, header: xsd.ismrmrdHeader) -> CartesianEncoding:
        """Read the first encoding; raises ReconError naming what is missing or unsupported."""
        if not header.encoding:
            raise ReconError("header has no encoding (ismrmrdHeader.encoding is empty)")
        enc = header.encoding[0]
        if enc.trajectory != xsd.trajectoryType.CARTESIAN:
            raise ReconError(f"encoding[0].trajectory is {_name(enc.trajectory)}, the cartesian "
                             "pipeline needs cartesian")
        for field in ("encodedSpace", "reconSpace"):
            if getattr(enc, field, None) is None:
                raise ReconError(f"header has no encoding[0].{field}")
        enc_matrix = _matrix(enc.encodedSpace)
        limits = enc.encodingLimits
        return cls(
            enc_matrix=enc_matrix,
            enc_fov=_fov(enc.encodedSpace),
            recon_matrix=_matrix(enc.reconSpace),
            recon_fov=_fov(enc.reconSpace),
            centre_e1=_centre(limits, "kspace_encoding_step_1", enc_matrix[1]),
            centre_e2=_centre(limits, "kspace_encoding_step_2", enc_matrix[2]),
        )


def _name(value) -> str:
    return getattr(value, "value", str(value))


def _matrix(space: xsd.encodingSpaceType) -> tuple[int, int, int]:
    m = space.matrixSize
    return int(m.x), int(m.y), max(int(m.z or 1), 1)


def _fov(space: xsd.encodingSpaceType) -> tuple[float, float, float]:
    f = space.fieldOfView_mm
    return float(f.x), float(f.y), float(f.z)


def _centre(limits: xsd.encodingLimitsType | None, field: str, n: int) -> int:
    limit = getattr(limits, field, None) if limits is not None else None
    if limit is None or limit.center is None:
        logger.debug("encodingLimits.%s has no centre: using matrix centre %d", field, n // 2)
        return n // 2
    return int(limit.center)


def imaging_mask(heads: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: readouts with image data of encoding space 0 (no noise, calibration-only, ...)."""
    skipped = (heads["flags"] & _SKIP_MASK) != 0
    return ~skipped & (heads["encoding_space_ref"] == 0)


class KspaceBuffer:
    """Accumulates readouts into one k-space per :data:`VolumeKey`, on the host.

    Each k-space is ``(ncoil, nz, ny, nx)`` complex64 with the encoded matrix; averages (and any
    repeated line) are summed and counted, then divided in :meth:`kspace`.
    """

    def __init__(self, enc: CartesianEncoding):
        self.enc = enc
        self.ncoil: int | None = None
        self._sums: dict[VolumeKey, np.ndarray] = {}
        self._counts: dict[VolumeKey, np.ndarray] = {}
        self._centre: dict[VolumeKey, tuple[int, np.void]] = {}
        self.skipped = 0

    def add(self, heads: np.ndarray, data: list[np.ndarray]) -> None:
        """Add readouts: ``heads`` ``(m,)`` acquisition headers, ``data`` ``m`` x ``(nch, ns)`` complex64."""
        keep = imaging_mask(heads)
        self.skipped += int((~keep).sum())
        for head, ksp in zip(heads[keep], (d for d, k in zip(data, keep, strict=True) if k), strict=True):
            self._add_one(head, ksp)

    def volume_keys(self) -> list[VolumeKey]:
        return sorted(self._sums)

    def kspace(self, key: VolumeKey) -> np.ndarray:
        """The averaged k-space ``(ncoil, nz, ny, nx)`` complex64 of one volume."""
        counts = np.maximum(self._counts[key], 1).astype(np.float32)
        return self._sums[key] / counts[None, :, :, None]

    def centre_head(self, key: VolumeKey) -> np.void:
        """The acquisition header nearest the k-space centre of one volume."""
        return self._centre[key][1]

    def _add_one(self, head: np.void, ksp: np.ndarray) -> None:
        key = _volume_key(head["idx"])
        e1, e2 = self._line(head)
        x0, x1 = self._readout_span(head)
        self._sums_for(key, ksp.shape[0])[:, e2, e1, x0:x1] += ksp[:, : x1 - x0]
        self._counts[key][e2, e1] += 1
        distance = abs(e1 - self.enc.enc_matrix[1] // 2) + abs(e2 - self.enc.enc_matrix[2] // 2)
        if key not in self._centre or distance < self._centre[key][0]:
            self._centre[key] = (distance, head.copy())

    def _sums_for(self, key: VolumeKey, ncoil: int) -> np.ndarray:
        if self.ncoil is None:
            self.ncoil = ncoil
        elif ncoil != self.ncoil:
            raise ReconError(f"readouts have {ncoil} channels, earlier ones {self.ncoil}")
        if key not in self._sums:
            nx, ny, nz = self.enc.enc_matrix
            self._sums[key] = np.zeros((ncoil, nz, ny, nx), dtype=np.complex64)
            self._counts[key] = np.zeros((nz, ny), dtype=np.int32)
        return self._sums[key]

    def _line(self, head: np.void) -> tuple[int, int]:
        nx, ny, nz = self.enc.enc_matrix
        e1 = int(head["idx"]["kspace_encode_step_1"]) - self.enc.centre_e1 + ny // 2
        e2 = int(head["idx"]["kspace_encode_step_2"]) - self.enc.centre_e2 + nz // 2 if nz > 1 else 0
        if not (0 <= e1 < ny and 0 <= e2 < nz):
            raise ReconError(f"readout {int(head['scan_counter'])} encode steps fall outside the "
                             f"encoded matrix {self.enc.enc_matrix}")
        return e1, e2

    def _readout_span(self, head: np.void) -> tuple[int, int]:
        nx = self.enc.enc_matrix[0]
        x0 = nx // 2 - int(head["center_sample"])
        x1 = x0 + int(head["number_of_samples"])
        if x0 < 0 or x1 > nx:
            raise ReconError(f"readout {int(head['scan_counter'])} has {int(head['number_of_samples'])} "
                             f"samples centred at {int(head['center_sample'])}: does not fit {nx}")
        return x0, x1


def _volume_key(idx: np.void) -> VolumeKey:
    return (int(idx["slice"]), int(idx["contrast"]), int(idx["phase"]),
            int(idx["repetition"]), int(idx["set"]))


def reconstruct(ksp, enc: CartesianEncoding):
    """Reconstruct one volume.

    The k-space is first zero-padded (or cropped) to the matrix whose pixel size is the recon
    space's (``recon_matrix * enc_fov / recon_fov``), transformed, then cropped in image space to
    the recon matrix: this removes readout (and phase or slice) oversampling.

    Args:
        ksp: ``(ncoil, nz, ny, nx)`` complex64 encoded k-space, numpy or cupy.
        enc: the encoding.

    Returns:
        ``(nz, ny, nx)`` float32 sum-of-squares magnitude in the recon matrix (nz is 1 for 2D),
        on the device of ``ksp``.
    """
    ncoil = ksp.shape[0]
    ksp = sp.resize(ksp, (ncoil,) + _kspace_matrix(enc))
    axes = (-3, -2, -1) if enc.is3d else (-2, -1)
    coil_img = fft.ifft(ksp, axes=axes)
    nx, ny, nz = enc.recon_matrix
    coil_img = sp.resize(coil_img, (ncoil, nz if enc.is3d else 1, ny, nx))
    return sos(coil_img, axis=0).astype(np.float32)


def _kspace_matrix(enc: CartesianEncoding) -> tuple[int, int, int]:
    """``(nz, ny, nx)``: the k-space size that gives the recon space's pixel size over the encoded FOV."""
    size = [round(m * fe / fr) if fr > 0 else e for m, fe, fr, e in
            zip(enc.recon_matrix, enc.enc_fov, enc.recon_fov, enc.enc_matrix, strict=True)]
    if not enc.is3d:
        size[2] = 1
    return size[2], size[1], size[0]


def image_geometries(buffer: KspaceBuffer, key: VolumeKey) -> list[ImageGeometry]:
    """Geometry of the 2D images of one volume: one for 2D, one per partition for 3D.

    For 3D, partition ``p`` sits at the centre acquisition's position moved along ``slice_dir``
    by ``(p - nz // 2)`` partition thicknesses; its ``slice`` is ``key slice * nz + p``.
    """
    head = buffer.centre_head(key)
    enc = buffer.enc
    if not enc.is3d:
        return [ImageGeometry.from_head(head)]
    nz = enc.recon_matrix[2]
    thickness = enc.recon_fov[2] / nz
    centre = np.asarray(head["position"], dtype=np.float64)
    slice_dir = np.asarray(head["slice_dir"], dtype=np.float64)
    return [ImageGeometry.from_head(head, position=tuple(centre + (p - nz // 2) * thickness * slice_dir),
                                    slice=key[0] * nz + p) for p in range(nz)]
