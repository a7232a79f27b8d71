"""Cartesian k-space buffering: readouts placed by their acquisition headers into one k-space per volume.

Readouts are placed by ``idx.kspace_encode_step_1/2`` relative to the header's encoding-limit
centres, so the centre line lands at the matrix centre (index ``n // 2``), and along readout by
``center_sample``; readouts flagged ``ACQ_IS_REVERSE`` are turned round first. 2D multi-slice
scans are told apart by ``idx.slice``, 3D scans have an encoded ``z`` matrix above 1. Averages are
averaged (or kept apart on request); slices, contrasts, phases, repetitions and sets are
buffered apart (:data:`VolumeKey`). Noise readouts are kept for pre-whitening, parallel-calibration
lines in a k-space of their own. Also what the buffered k-space says about itself: the partial
Fourier extents of each axis, and where each volume's images lie.

References:
    Inati SJ et al. ISMRM Raw data format. Magn Reson Med 2017;77:411-421.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np

from reconq.recon.errors import ReconError
from reconq.recon.images import ImageGeometry
from reconq.recon.partialfourier import Extents

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
_CALIB_MASK = np.uint64((1 << (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION - 1))
                        | (1 << (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING - 1)))
_NOISE_MASK = np.uint64(1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1))
_REVERSE_MASK = np.uint64(1 << (ismrmrd.ACQ_IS_REVERSE - 1))

#: Counters that make separate images: (slice, contrast, phase, repetition, set, average);
#: average is 0 unless averages are kept apart.
VolumeKey = tuple[int, int, int, int, int, int]


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
                             "pipeline needs cartesian (radial, golden-angle and other "
                             "trajectories: the radial pipeline)")
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


def kspace_matrix(enc: CartesianEncoding) -> tuple[int, int, int]:
    """``(nz, ny, nx)``: the k-space size that gives the recon space's pixel size over the encoded FOV."""
    size = [round(m * fe / fr) if fr > 0 else e for m, fe, fr, e in
            zip(enc.recon_matrix, enc.enc_fov, enc.recon_fov, enc.enc_matrix, strict=True)]
    if not enc.is3d:
        size[2] = 1
    return size[2], size[1], size[0]


def imaging_mask(heads: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: readouts with image data of encoding space 0 (no noise, calibration-only, ...)."""
    skipped = (heads["flags"] & _SKIP_MASK) != 0
    return ~skipped & (heads["encoding_space_ref"] == 0)


def calibration_mask(heads: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: parallel-calibration readouts (``ACQ_IS_PARALLEL_CALIBRATION(_AND_IMAGING)``)."""
    return ((heads["flags"] & _CALIB_MASK) != 0) & (heads["encoding_space_ref"] == 0)


def noise_mask(heads: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: noise-measurement readouts."""
    return (heads["flags"] & _NOISE_MASK) != 0


class _Kspaces:
    """Summed readouts and their counts, one ``(ncoil, nz, ny, nx)`` complex64 k-space per key."""

    def __init__(self, enc_matrix: tuple[int, int, int]):
        self.enc_matrix = enc_matrix
        self.sums: dict[VolumeKey, np.ndarray] = {}
        self.counts: dict[VolumeKey, np.ndarray] = {}

    def add(self, key: VolumeKey, e1: int, e2: int, x0: int, x1: int, ksp: np.ndarray) -> None:
        if key not in self.sums:
            nx, ny, nz = self.enc_matrix
            self.sums[key] = np.zeros((ksp.shape[0], nz, ny, nx), dtype=np.complex64)
            self.counts[key] = np.zeros((nz, ny), dtype=np.int32)
        self.sums[key][:, e2, e1, x0:x1] += ksp[:, : x1 - x0]
        self.counts[key][e2, e1] += 1

    def mean(self, key: VolumeKey) -> np.ndarray:
        counts = np.maximum(self.counts[key], 1).astype(np.float32)
        return self.sums[key] / counts[None, :, :, None]


class KspaceBuffer:
    """Accumulates readouts into one k-space per :data:`VolumeKey`, on the host.

    Each k-space is ``(ncoil, nz, ny, nx)`` complex64 with the encoded matrix; averages (and any
    repeated line) are summed and counted, then divided in :meth:`kspace`. Parallel-calibration
    lines go (also) to :meth:`calibration`, noise readouts to :attr:`noise`.

    Args:
        enc: the encoding.
        keep_averages: reconstruct averages apart instead of averaging them.
    """

    def __init__(self, enc: CartesianEncoding, keep_averages: bool = False):
        self.enc = enc
        self.keep_averages = keep_averages
        self.ncoil: int | None = None
        self._imaging = _Kspaces(enc.enc_matrix)
        self._calib = _Kspaces(enc.enc_matrix)
        self._centre: dict[VolumeKey, tuple[int, np.void]] = {}
        self._span: dict[VolumeKey, tuple[int, int]] = {}
        self.noise: list[np.ndarray] = []
        self.noise_dwell_us: float | None = None
        self.dwell_us: float | None = None
        self.skipped = 0

    def add(self, heads: np.ndarray, data: list[np.ndarray]) -> None:
        """Add readouts: ``heads`` ``(m,)`` acquisition headers, ``data`` ``m`` x ``(nch, ns)`` complex64."""
        imaging, calib, noise = imaging_mask(heads), calibration_mask(heads), noise_mask(heads)
        self.skipped += int((~imaging).sum())
        for i in np.flatnonzero(imaging | calib | noise):
            head, ksp = heads[i], data[i]
            self._check_channels(ksp.shape[0])
            if noise[i]:
                self.noise.append(ksp)
                self.noise_dwell_us = float(head["sample_time_us"])
                continue
            if head["flags"] & _REVERSE_MASK:
                ksp = ksp[:, ::-1]
            self._add_one(head, ksp, imaging[i], calib[i])

    def volume_keys(self) -> list[VolumeKey]:
        return sorted(self._imaging.sums)

    def kspace(self, key: VolumeKey) -> np.ndarray:
        """The averaged k-space ``(ncoil, nz, ny, nx)`` complex64 of one volume."""
        return self._imaging.mean(key)

    def sampled(self, key: VolumeKey) -> np.ndarray:
        """``(nz, ny)`` bool: the phase-encode lines with imaging data."""
        return self._imaging.counts[key] > 0

    def readout_span(self, key: VolumeKey) -> tuple[int, int]:
        """``(x0, x1)``: the readout samples of the encoded matrix that any readout covered."""
        return self._span[key]

    def calibration(self, key: VolumeKey) -> np.ndarray | None:
        """The parallel-calibration k-space ``(ncoil, nz, ny, nx)`` complex64 of one volume, or None.

        Calibration lines are looked up by slice alone (the other counters of a separately
        acquired calibration need not match the imaging volume's).
        """
        matches = [k for k in self._calib.sums if k[0] == key[0]]
        if not matches:
            return None
        return self._calib.mean(key if key in matches else matches[0])

    def noise_samples(self) -> np.ndarray | None:
        """All noise readouts as ``(ncoil, nsamples)`` complex64, or None without any."""
        return np.concatenate(self.noise, axis=1) if self.noise else None

    def centre_head(self, key: VolumeKey) -> np.void:
        """The acquisition header nearest the k-space centre of one volume."""
        return self._centre[key][1]

    def _add_one(self, head: np.void, ksp: np.ndarray, imaging: bool, calib: bool) -> None:
        key = volume_key(head["idx"], self.keep_averages)
        e1, e2 = self._line(head)
        x0, x1 = self._readout_span(head)
        if calib:
            self._calib.add(key, e1, e2, x0, x1, ksp)
        if not imaging:
            return
        self.dwell_us = float(head["sample_time_us"])
        self._imaging.add(key, e1, e2, x0, x1, ksp)
        span = self._span.get(key, (x0, x1))
        self._span[key] = (min(span[0], x0), max(span[1], x1))
        distance = abs(e1 - self.enc.enc_matrix[1] // 2) + abs(e2 - self.enc.enc_matrix[2] // 2)
        if key not in self._centre or distance < self._centre[key][0]:
            self._centre[key] = (distance, head.copy())

    def _check_channels(self, ncoil: int) -> None:
        if self.ncoil is None:
            self.ncoil = ncoil
        elif ncoil != self.ncoil:
            raise ReconError(f"readouts have {ncoil} channels, earlier ones {self.ncoil}")

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


def volume_key(idx: np.void, keep_averages: bool = False) -> VolumeKey:
    """The volume a readout belongs to, from its counters (:data:`VolumeKey`)."""
    return (int(idx["slice"]), int(idx["contrast"]), int(idx["phase"]),
            int(idx["repetition"]), int(idx["set"]), int(idx["average"]) if keep_averages else 0)


def partial_fourier_extents(buffer: KspaceBuffer, key: VolumeKey, accel: tuple[int, int] = (1, 1)) -> Extents:
    """The acquired extent of each k-space axis ``(-3: kz, -2: ky, -1: kx)`` that is partial.

    An axis is partial when more lines (samples) than the acceleration leaves out are missing at
    one edge; axes acquired in full are left out of the result.
    """
    nx, ny, nz = buffer.enc.enc_matrix
    sampled = buffer.sampled(key)
    extents: dict[int, tuple[int, int]] = {}
    for axis, lines, n, r in ((-3, sampled.any(axis=1), nz, accel[1]), (-2, sampled.any(axis=0), ny, accel[0])):
        hit = np.flatnonzero(lines)
        if n > 1 and hit.size and (hit[0] > r or n - 1 - hit[-1] > r):
            extents[axis] = (int(hit[0]), int(hit[-1]) + 1)
    x0, x1 = buffer.readout_span(key)
    if x0 > 1 or nx - x1 > 1:
        extents[-1] = (x0, x1)
    return extents


def image_geometries(buffer: KspaceBuffer, key: VolumeKey) -> list[ImageGeometry]:
    """Geometry of the 2D images of one volume: one for 2D, one per partition for 3D.

    For 3D, partition ``p`` sits at the centre acquisition's position moved along ``slice_dir``
    by ``(p - nz // 2)`` partition thicknesses; its ``slice`` is ``key slice * nz + p``.
    """
    head = buffer.centre_head(key)
    enc = buffer.enc
    if not enc.is3d:
        return [ImageGeometry.from_head(head, average=key[5])]
    nz = enc.recon_matrix[2]
    thickness = enc.recon_fov[2] / nz
    centre = np.asarray(head["position"], dtype=np.float64)
    slice_dir = np.asarray(head["slice_dir"], dtype=np.float64)
    return [ImageGeometry.from_head(head, position=tuple(centre + (p - nz // 2) * thickness * slice_dir),
                                    slice=key[0] * nz + p, average=key[5]) for p in range(nz)]
