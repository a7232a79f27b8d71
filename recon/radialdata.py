"""Non-Cartesian raw data for the ``radial`` pipeline: the encoding, the trajectories and the samples.

What a radial scan's header and readouts say, turned into the arrays :mod:`reconq.recon.radial`
reconstructs: one set of k-space coordinates on the recon grid per volume, and every coil's samples.

Trajectory units. A readout's ``traj`` (``trajectory_dimensions`` 2 or 3, columns x = read, y = phase,
z = partition) is *normalised*: the edge of the encoded k-space is ±0.5 (Gadgetron's convention), unless
the header's ``encoding[0].trajectoryDescription`` has a ``userParameterString`` ``units`` =
``cycles_per_fov``: then it is in cycles per encoded FOV, ±matrix/2 (BART's and sigpy's). Both are
converted to cycles per *recon* FOV, the NUFFT's units on the recon grid (``recon matrix`` points over
``recon FOV``): ``k [cycles/mm] × recon FOV [mm]``. Any other ``units``, or a coordinate outside the
stated range, is a :class:`~reconq.recon.errors.ReconError` that says so.

Kinds of scan (:attr:`RadialEncoding.kind`):

- ``"2d"``: 2D trajectories, one image per slice (``idx.slice``), radial in-plane;
- ``"stack"``: stack-of-stars: 2D trajectories in-plane and Cartesian partitions
  (``idx.kspace_encode_step_2`` about ``encodingLimits.kspace_encoding_step_2.center``), an encoded ``z``
  matrix above 1; the partitions become the NUFFT's third axis at integer ``kz``;
- ``"3d"``: 3D trajectories (a "kooshball"), one image per partition of the recon ``z`` matrix.

Volumes are told apart by slice, contrast (echo), phase, repetition and set; averages are more spokes
of the same volume. Readouts without imaging data (noise, navigators, calibration-only) are skipped, the
noise ones kept for pre-whitening. A readout flagged ``ACQ_IS_REVERSE`` needs nothing turned round: its
trajectory says where each of its samples lies.

References:
    Inati SJ et al. ISMRM Raw data format. Magn Reson Med 2017;77:411-421 (``acq.traj``).
    Hansen MS, Sørensen TS. Gadgetron: an open source framework for medical image reconstruction.
    Magn Reson Med 2013;69:1768-1776 (trajectories normalised to ±0.5).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ismrmrd.xsd as xsd
import numpy as np

from reconq.recon.errors import ReconError
from reconq.recon.images import ImageGeometry
from reconq.recon.kspace import imaging_mask, noise_mask
from reconq.recon.rawdata import RawScan

logger = logging.getLogger(__name__)

#: The trajectory types the ``radial`` pipeline reconstructs (``other``: kooshballs, Pulseq sequences).
RADIAL_TYPES = (xsd.trajectoryType.RADIAL, xsd.trajectoryType.GOLDENANGLE, xsd.trajectoryType.OTHER)
#: ``units`` values of ``trajectoryDescription``: normalised (±0.5, the default) or cycles per FOV.
UNITS = ("normalised", "normalized", "cycles_per_fov")
#: A coordinate may exceed the stated edge by this fraction (rounding in the sequence's arithmetic).
RANGE_TOLERANCE = 1e-3

#: Counters that make separate volumes: (slice, contrast, phase, repetition, set).
RadialKey = tuple[int, int, int, int, int]


@dataclass(frozen=True)
class RadialEncoding:
    """What the radial recon needs from the header's first encoding; matrices and FOVs are ``(x, y, z)``."""

    trajectory: str
    units: str
    enc_matrix: tuple[int, int, int]
    enc_fov: tuple[float, float, float]
    recon_matrix: tuple[int, int, int]
    recon_fov: tuple[float, float, float]
    centre_e2: int
    echoes: int = 1
    spokes: int = 0

    @classmethod
    def from_header(cls, header: xsd.ismrmrdHeader) -> RadialEncoding:
        """Read the first encoding; raises ReconError naming what is missing or unsupported."""
        if not header.encoding:
            raise ReconError("header has no encoding (ismrmrdHeader.encoding is empty)")
        enc = header.encoding[0]
        if enc.trajectory not in RADIAL_TYPES:
            kinds = ", ".join(t.value for t in RADIAL_TYPES)
            raise ReconError(f"encoding[0].trajectory is {getattr(enc.trajectory, 'value', enc.trajectory)}: "
                             f"the radial pipeline reconstructs {kinds} (use cartesian or sense for cartesian)")
        for name in ("encodedSpace", "reconSpace"):
            space = getattr(enc, name, None)
            if space is None or space.matrixSize is None or space.fieldOfView_mm is None:
                raise ReconError(f"header has no encoding[0].{name} matrix and field of view")
        enc_matrix, recon_matrix = _matrix(enc.encodedSpace), _matrix(enc.reconSpace)
        enc_fov, recon_fov = _fov(enc.encodedSpace), _fov(enc.reconSpace)
        for name, fov in (("encodedSpace", enc_fov), ("reconSpace", recon_fov)):
            if min(fov[:2]) <= 0 or (fov[2] <= 0 and name == "reconSpace" and recon_matrix[2] > 1):
                raise ReconError(f"encoding[0].{name}.fieldOfView_mm is {fov}: must be positive")
        limits = enc.encodingLimits
        return cls(
            trajectory=enc.trajectory.value, units=_units(enc.trajectoryDescription),
            enc_matrix=enc_matrix, enc_fov=enc_fov, recon_matrix=recon_matrix, recon_fov=recon_fov,
            centre_e2=_centre(limits, "kspace_encoding_step_2", enc_matrix[2]),
            echoes=_count(limits, "contrast"), spokes=_count(limits, "kspace_encoding_step_1"))

    def kind(self, tdim: int) -> str:
        """``"2d"``, ``"stack"`` or ``"3d"`` for trajectories of ``tdim`` dimensions."""
        if tdim == 3:
            return "3d"
        if tdim == 2:
            return "stack" if self.enc_matrix[2] > 1 else "2d"
        raise ReconError(f"trajectory_dimensions {tdim}: the radial pipeline needs 2 or 3")

    def grid_shape(self, kind: str) -> tuple[int, ...]:
        """The recon grid in image-axis order: ``(ny, nx)`` for 2D, ``(nz, ny, nx)`` for 3D."""
        nx, ny, nz = self.recon_matrix
        return (ny, nx) if kind == "2d" else (nz, ny, nx)

    def edge(self, axis: int) -> float:
        """The largest coordinate allowed on trajectory axis ``axis`` (0 x, 1 y, 2 z) in the stated units."""
        return 0.5 if self.units != "cycles_per_fov" else self.enc_matrix[axis] / 2

    def to_grid(self, traj: np.ndarray, e2: int | None = None, readout: int = 0) -> np.ndarray:
        """One readout's trajectory ``(ns, tdim)`` as ``(ns, ndim)`` cycles per recon FOV, image-axis order.

        Columns come out ``(ky, kx)`` in 2D and ``(kz, ky, kx)`` in 3D; a stack-of-stars readout gets
        ``kz`` from its partition ``e2``. Raises ReconError for a coordinate outside the stated range.
        """
        traj = np.asarray(traj, dtype=np.float64)
        tdim = traj.shape[1]
        out = np.empty_like(traj)
        for axis in range(tdim):
            edge, k = self.edge(axis), traj[:, axis]
            worst = float(np.abs(k).max()) if k.size else 0.0
            if not np.isfinite(worst) or worst > edge * (1 + RANGE_TOLERANCE):
                units = "cycles per FOV, ±matrix/2" if self.units == "cycles_per_fov" else "normalised, ±0.5"
                raise ReconError(f"readout {readout}: trajectory axis {'xyz'[axis]} reaches {worst:g}, outside "
                                 f"±{edge:g} ({units}; trajectoryDescription units={self.units})")
            if self.enc_fov[axis] <= 0:
                raise ReconError(f"trajectory axis {'xyz'[axis]} needs encoding[0].encodedSpace.fieldOfView_mm."
                                 f"{'xyz'[axis]} > 0, got {self.enc_fov[axis]:g}")
            per_mm = k * (self.enc_matrix[axis] if self.units != "cycles_per_fov" else 1.0) / self.enc_fov[axis]
            out[:, tdim - 1 - axis] = per_mm * self.recon_fov[axis]
        if tdim == 2 and e2 is not None and self.enc_matrix[2] > 1:
            kz = float(e2 - self.centre_e2)  # cycles per encoded z FOV, then per recon z FOV
            if self.enc_fov[2] > 0 and self.recon_fov[2] > 0:
                kz *= self.recon_fov[2] / self.enc_fov[2]
            out = np.concatenate([np.full((len(out), 1), kz), out], axis=1)
        return out.astype(np.float32)


def _units(description: xsd.trajectoryDescriptionType | None) -> str:
    params = description.userParameterString if description is not None else []
    value = next((p.value for p in params if p.name == "units"), "normalised")
    value = str(value).strip().lower()
    if value not in UNITS:
        raise ReconError(f"trajectoryDescription units={value!r} is not known: use normalised (±0.5, "
                         "the default) or cycles_per_fov (±matrix/2)")
    return "cycles_per_fov" if value == "cycles_per_fov" else "normalised"


def _matrix(space: xsd.encodingSpaceType) -> tuple[int, int, int]:
    m = space.matrixSize
    return int(m.x), int(m.y), max(int(m.z or 1), 1)


def _fov(space: xsd.encodingSpaceType) -> tuple[float, float, float]:
    f = space.fieldOfView_mm
    return float(f.x), float(f.y), float(f.z or 0.0)


def _centre(limits, name: str, n: int) -> int:
    limit = getattr(limits, name, None) if limits is not None else None
    return int(limit.center) if limit is not None and limit.center is not None else n // 2


def _count(limits, name: str) -> int:
    limit = getattr(limits, name, None) if limits is not None else None
    return int(limit.maximum) + 1 if limit is not None and limit.maximum is not None else 1


@dataclass
class RadialVolume:
    """One volume's readouts: coordinates on the recon grid and samples, in acquisition order."""

    key: RadialKey
    coords: list[np.ndarray] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)
    head: np.void | None = None

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """``(nreadouts, ns, ndim)`` float32 coordinates and ``(ncoil, nreadouts, ns)`` complex64 samples."""
        sizes = sorted({len(c) for c in self.coords})
        if len(sizes) > 1:
            raise ReconError(f"volume {self.key}: readouts have {sizes} samples; one volume needs one length")
        return np.stack(self.coords), np.stack(self.samples, axis=1)


@dataclass
class RadialData:
    """All volumes of a scan, the kind of trajectory, and the noise readouts."""

    enc: RadialEncoding
    kind: str
    volumes: dict[RadialKey, RadialVolume]
    noise: list[np.ndarray]
    noise_dwell_us: float | None
    dwell_us: float | None
    skipped: int

    def noise_samples(self) -> np.ndarray | None:
        return np.concatenate(self.noise, axis=1) if self.noise else None

    def groups(self) -> list[list[RadialKey]]:
        """The echoes of one slice (phase, repetition, set) that share one trajectory, so one NUFFT plan
        (and one set of coil maps), in key order; other slices are other groups."""
        groups: list[tuple[RadialKey, list[np.ndarray], list[RadialKey]]] = []
        for key in sorted(self.volumes):
            coords = self.volumes[key].coords
            for first, known, keys in groups:
                if (first[0], *first[2:]) == (key[0], *key[2:]) and len(known) == len(coords) and all(
                        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(known, coords, strict=True)):
                    keys.append(key)
                    break
            else:
                groups.append((key, coords, [key]))
        return [keys for _, _, keys in groups]

    def geometries(self, key: RadialKey) -> list[ImageGeometry]:
        """Where the images of one volume lie: one for 2D, one per recon partition for 3D.

        As the Cartesian 3D path: partition ``p`` sits at the readouts' position moved along
        ``slice_dir`` by ``(p - nz // 2)`` partition thicknesses; its ``slice`` is ``key slice * nz + p``.
        """
        head = self.volumes[key].head
        assert head is not None
        if self.kind == "2d":
            return [ImageGeometry.from_head(head, contrast=key[1], average=0)]
        nz = self.enc.recon_matrix[2]
        thickness = self.enc.recon_fov[2] / nz
        centre = np.asarray(head["position"], dtype=np.float64)
        slice_dir = np.asarray(head["slice_dir"], dtype=np.float64)
        return [ImageGeometry.from_head(head, position=tuple(centre + (p - nz // 2) * thickness * slice_dir),
                                        slice=key[0] * nz + p, contrast=key[1], average=0) for p in range(nz)]


#: ``trajectory(index, head)``: the ``(ns, tdim)`` trajectory of a readout that carries none in the file.
TrajectorySource = Callable[[int, np.void], np.ndarray]


def read_radial(scan: RawScan, enc: RadialEncoding, progress: Callable[[float, str], None], share: float,
                heads: np.ndarray | None = None, trajectories: Sequence[np.ndarray | None] | None = None,
                chunk: int = 2048) -> RadialData:
    """Read every readout of ``scan`` into volumes; progress runs from 0 to ``share``.

    Args:
        heads: the acquisition headers to use instead of the file's (counters set from a sequence's
            labels); same length as the scan.
        trajectories: per acquisition, the ``(ns, tdim)`` trajectory in the encoding's units where the
            file carries none (from a Pulseq sequence); ``None`` entries fall back to ``acq.traj``.
    """
    heads = scan.heads if heads is None else heads
    volumes: dict[RadialKey, RadialVolume] = {}
    noise: list[np.ndarray] = []
    noise_dwell = dwell = None
    kind: str | None = None
    ncoil: int | None = None
    skipped = 0
    progress(0.0, "reading")
    for part in scan.iter_chunks(chunk):
        block = heads[part.start: part.start + len(part.heads)]
        imaging, is_noise = imaging_mask(block), noise_mask(block)
        skipped += int((~imaging & ~is_noise).sum())
        for i in np.flatnonzero(imaging | is_noise):
            n, head, data = int(part.start + i), block[i], part.data[i]
            if ncoil is None:
                ncoil = data.shape[0]
            elif data.shape[0] != ncoil:
                raise ReconError(f"readout {n} has {data.shape[0]} channels, earlier ones {ncoil}")
            if is_noise[i]:
                noise.append(data)
                noise_dwell = float(head["sample_time_us"])
                continue
            traj = part.traj[i] if part.traj[i] is not None else (trajectories[n] if trajectories else None)
            if traj is None:
                raise ReconError(f"readout {n} has no trajectory (trajectory_dimensions 0) and the header "
                                 "names no Pulseq sequence (userParameterString seq_signature)")
            if len(traj) != data.shape[1]:
                raise ReconError(f"readout {n}: {len(traj)} trajectory points for {data.shape[1]} samples")
            if not np.isfinite(data).all():
                raise ReconError(f"readout {n} holds samples that are not finite (NaN or Inf)")
            readout_kind = enc.kind(traj.shape[1])
            if kind is None:
                kind = readout_kind
            elif readout_kind != kind:
                raise ReconError(f"readout {n}: {traj.shape[1]}D trajectory after {kind} ones")
            key = _key(head["idx"])
            e2 = int(head["idx"]["kspace_encode_step_2"])
            volume = volumes.setdefault(key, RadialVolume(key))
            volume.coords.append(enc.to_grid(traj, e2, n))
            volume.samples.append(np.ascontiguousarray(data, dtype=np.complex64))
            if volume.head is None:
                volume.head = head.copy()
            dwell = float(head["sample_time_us"])
        progress(share * (part.start + len(part.heads)) / max(len(scan), 1), "reading")
    if not volumes or kind is None:
        raise ReconError(f"{scan.path.name}: no imaging readouts ({skipped} skipped)")
    return RadialData(enc, kind, volumes, noise, noise_dwell, dwell, skipped)


def _key(idx: np.void) -> RadialKey:
    return (int(idx["slice"]), int(idx["contrast"]), int(idx["phase"]), int(idx["repetition"]), int(idx["set"]))
