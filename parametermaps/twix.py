"""A twix-like view of a raw MRD file: the mapped header, and the readouts sorted into parts.

``read_twix(path)`` reads the XML header and every readout's acquisition header once (no samples),
sorts the readouts by their acquisition flags into the parts ``image``, ``refscan``, ``noise``,
``phasecor`` and ``navigator``, and maps the header. Samples are read only when a part is indexed, and
only the readouts the selection needs::

    twix = read_twix("raw.h5")
    twix.hdr.Meas.lBaseResolution           # mapVBVD style; twix["hdr"]["Meas"][...] also works
    img = twix.image                        # or twix["image"]
    img.dims, img.shape                     # ('Col', 'Cha', 'Lin', ...), sizes from the counters
    ksp = img[:, :, :, 0, 3]                # Col, Cha, Lin of partition 0, slice 3 (numpy indexing)
    img.squeeze = True                      # singleton dimensions dropped, from dims and from indexing
    ksp = img.select(Sli=3, Eco=slice(0, 2))  # by dimension name
    img.Lin, img.is_reverse                 # per-readout counters and flags, in file order
    traj = img.traj[...]                    # trajectories: float32 ('Col', 'Dim', 'Lin', ...)

Each readout is placed by its encoding counters: ``Lin`` = kspace_encode_step_1, ``Par`` =
kspace_encode_step_2, ``Sli`` = slice, ``Ave`` = average, ``Phs`` = phase, ``Eco`` = contrast,
``Rep`` = repetition, ``Set`` = set, ``Seg`` = segment. Noise readouts carry no counters: the k-th
noise readout is put at ``Lin`` = k. Where two readouts of a part share every counter the later
one wins (see :attr:`TwixPart.n_duplicates`). Positions nothing was measured at hold zeros.
Arrays are complex64 in Fortran order (``Col`` fastest, as in mapVBVD).

A selection allocates its output once and reads each readout's samples from the file straight into
their place in it (see :mod:`reconq.core.mrdfile`); only readouts that need reshaping (a subset of
``Col`` or ``Cha``, ``remove_os``, a readout shorter than the part's) go through a one-readout buffer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import ismrmrd
import ismrmrd.xsd
import numpy as np

from reconq.core.mrdfile import Dest, MrdFile, MrdFileError

from .errors import TwixError
from .mapping import ParameterMap, TwixHeader, load_map
from .sources import ScanContext

log = logging.getLogger(__name__)

DIMS = ("Col", "Cha", "Lin", "Par", "Sli", "Ave", "Phs", "Eco", "Rep", "Set", "Seg")
#: dimensions of a part's trajectories: ``Dim`` the trajectory dimension (kx, ky, kz, ...).
TRAJ_DIMS = ("Col", "Dim", *DIMS[2:])
#: twix loop dimension → ismrmrd encoding counter.
COUNTERS = {
    "Lin": "kspace_encode_step_1", "Par": "kspace_encode_step_2", "Sli": "slice", "Ave": "average",
    "Phs": "phase", "Eco": "contrast", "Rep": "repetition", "Set": "set", "Seg": "segment",
}
PARTS = ("image", "refscan", "noise", "phasecor", "navigator")


def flag_bit(name: str) -> int:
    """The mask of the ismrmrd acquisition flag ``name`` (``ACQ_IS_REVERSE`` or ``IS_REVERSE``)."""
    full = name if name.startswith("ACQ_") else "ACQ_" + name
    try:
        return 1 << (getattr(ismrmrd, full) - 1)
    except AttributeError:
        raise TwixError(f"no ismrmrd acquisition flag {full!r}") from None


def _mask(flags: np.ndarray, *names: str) -> np.ndarray:
    bits = 0
    for name in names:
        bits |= flag_bit(name)
    return (flags & np.uint64(bits)) != 0


def sort_readouts(flags: np.ndarray) -> dict[str, np.ndarray]:
    """Row numbers of each part, by acquisition flags. Readouts flagged
    ``PARALLEL_CALIBRATION_AND_IMAGING`` are in both ``image`` and ``refscan``; dummy scans, feedback,
    surface-coil-correction and phase-stabilisation readouts are in no part."""
    flags = np.asarray(flags, dtype=np.uint64)
    calib_only = _mask(flags, "IS_PARALLEL_CALIBRATION")
    not_image = _mask(
        flags, "IS_NOISE_MEASUREMENT", "IS_PHASECORR_DATA", "IS_NAVIGATION_DATA", "IS_PARALLEL_CALIBRATION",
        "IS_DUMMYSCAN_DATA", "IS_RTFEEDBACK_DATA", "IS_HPFEEDBACK_DATA", "IS_SURFACECOILCORRECTIONSCAN_DATA",
        "IS_PHASE_STABILIZATION", "IS_PHASE_STABILIZATION_REFERENCE",
    )
    masks = {
        "image": ~not_image,
        "refscan": calib_only | _mask(flags, "IS_PARALLEL_CALIBRATION_AND_IMAGING"),
        "noise": _mask(flags, "IS_NOISE_MEASUREMENT"),
        "phasecor": _mask(flags, "IS_PHASECORR_DATA"),
        "navigator": _mask(flags, "IS_NAVIGATION_DATA"),
    }
    return {name: np.flatnonzero(m) for name, m in masks.items()}


class _Indexed:
    """Indexing shared by a part and its trajectories: :attr:`dims` and :attr:`shape` from
    ``full_dims``, ``full_shape`` and ``squeeze``; positional indexing and :meth:`select` by name."""

    name: str

    @property
    def full_dims(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def full_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def squeeze(self) -> bool:
        raise NotImplementedError

    def _read(self, index: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    @property
    def dims(self) -> tuple[str, ...]:
        """The dimensions indexing uses: all of them, or the non-singleton ones when ``squeeze`` is set."""
        return tuple(d for d, n in zip(self.full_dims, self.full_shape, strict=True)
                     if n != 1 or not self.squeeze)

    @property
    def shape(self) -> tuple[int, ...]:
        full = dict(zip(self.full_dims, self.full_shape, strict=True))
        return tuple(full[d] for d in self.dims)

    def __getitem__(self, key: Any) -> np.ndarray:
        keys = key if isinstance(key, tuple) else (key,)
        dims = self.dims
        if any(k is Ellipsis for k in keys):
            i = next(i for i, k in enumerate(keys) if k is Ellipsis)
            fill = (slice(None),) * (len(dims) - len(keys) + 1)
            keys = keys[:i] + fill + keys[i + 1:]
        if len(keys) > len(dims):
            raise TwixError(f"{len(keys)} indices for the {len(dims)} dimensions {dims} of {self.name}")
        return self.select(**dict(zip(dims, keys, strict=False)))

    def select(self, **selection: Any) -> np.ndarray:
        """The data at ``selection`` (dimension name → int, slice, or sequence of ints); unnamed
        dimensions whole. Integers drop their dimension; with ``squeeze`` singletons are dropped too."""
        unknown = set(selection) - set(self.full_dims)
        if unknown:
            raise TwixError(f"unknown dimensions {sorted(unknown)}; the dimensions are {self.full_dims}")
        index, drop = [], []
        for dim, size in zip(self.full_dims, self.full_shape, strict=True):
            sel = selection.get(dim, slice(None))
            index.append(idx := _normalise(sel, size, dim))
            scalar = np.ndim(sel) == 0 and not isinstance(sel, slice)
            drop.append(len(idx) == 1 and (scalar or (self.squeeze and size == 1)))
        out = self._read(index)
        return out.reshape([n for n, d in zip(out.shape, drop, strict=True) if not d], order="F")


class TwixPart(_Indexed):
    """The readouts of one part, indexable by the twix dimensions ``Col, Cha, Lin, Par, Sli, Ave, Phs,
    Eco, Rep, Set, Seg`` (numpy indexing semantics: an integer drops its dimension).

    ``squeeze`` (default False) drops the singleton dimensions from :attr:`dims`, :attr:`shape` and
    from positional indexing, as mapVBVD's ``squeeze`` flag and twixtools' ``squeeze_singletons`` do.
    ``remove_os`` (default False) halves ``Col`` by cropping the readout's centre in the Fourier domain,
    as mapVBVD's ``flagRemoveOS``. :attr:`traj` indexes the readouts' trajectories the same way.
    """

    def __init__(self, name: str, scan: TwixScan, rows: np.ndarray) -> None:
        self.name = name
        self.rows = rows
        self._squeeze = False
        self.remove_os = False
        self._scan = scan
        heads = scan.heads[rows]
        idx = heads["idx"]
        self._counters = np.stack([idx[c].astype(np.int64) for c in COUNTERS.values()], axis=1).reshape(
            len(rows), len(COUNTERS))
        if name == "noise":
            self._counters[:, 0] = np.arange(len(rows))
        n_samples = int(heads["number_of_samples"].max(initial=0))
        n_channels = int(heads["active_channels"].max(initial=0))
        n_traj = int(heads["trajectory_dimensions"].max(initial=0))
        loop = (self._counters.max(axis=0) + 1) if len(rows) else np.zeros(len(COUNTERS), np.int64)
        self._full_shape = (n_samples, n_channels, *map(int, loop))
        self._traj_shape = (n_samples, n_traj, *map(int, loop))

    # --- what the part holds ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        sizes = dict(zip(self.dims, self.shape, strict=True))
        return f"<TwixPart {self.name}: {len(self)} readouts, {sizes}>"

    @property
    def full_dims(self) -> tuple[str, ...]:
        return DIMS

    @property
    def full_shape(self) -> tuple[int, ...]:
        """Sizes of every dimension: ``Col`` and ``Cha`` the largest readout, loop dims max counter + 1."""
        if self.remove_os:
            return (self._full_shape[0] // 2, *self._full_shape[1:])
        return self._full_shape

    @property
    def squeeze(self) -> bool:
        return self._squeeze

    @squeeze.setter
    def squeeze(self, value: bool) -> None:
        self._squeeze = bool(value)

    @property
    def heads(self) -> np.ndarray:
        """The acquisition headers of the part's readouts, in file order."""
        return self._scan.heads[self.rows]

    @property
    def traj(self) -> TwixTrajectory:
        """The readouts' trajectories, indexable as the part: float32, dimensions :data:`TRAJ_DIMS`
        (``Col``, ``Dim``, ``Lin``, ...) with ``Dim`` the largest ``trajectory_dimensions``. The part's
        ``squeeze`` applies; ``remove_os`` does not (``Col`` is always every sample)."""
        return TwixTrajectory(self)

    @property
    def n_duplicates(self) -> int:
        """Readouts that land where a later readout of this part lands too (and are overwritten)."""
        return len(self) - len(np.unique(self._counters, axis=0)) if len(self) else 0

    @property
    def flags(self) -> np.ndarray:
        """Acquisition flags (uint64) of every readout, in file order."""
        return self._scan.heads["flags"][self.rows]

    def has_flag(self, name: str) -> np.ndarray:
        """Whether each readout carries the flag ``name`` (``IS_REVERSE``, ``LAST_IN_SLICE``, ...)."""
        return _mask(self.flags, name)

    @property
    def is_reverse(self) -> np.ndarray:
        return self.has_flag("IS_REVERSE")

    @property
    def is_last_in_slice(self) -> np.ndarray:
        return self.has_flag("LAST_IN_SLICE")

    def counter(self, dim: str) -> np.ndarray:
        """The ``dim`` counter (``Lin``, ``Par``, ...) of every readout, in file order."""
        try:
            return self._counters[:, list(COUNTERS).index(dim)]
        except ValueError:
            raise TwixError(f"{dim!r} is not one of {list(COUNTERS)}") from None

    def __getattr__(self, name: str) -> np.ndarray:
        if name in COUNTERS:
            return self.counter(name)
        raise AttributeError(name)

    # --- selection -------------------------------------------------------------------------------

    def _read(self, index: list[np.ndarray]) -> np.ndarray:
        return self._place(index, "data")

    def _place(self, index: list[np.ndarray], member: str) -> np.ndarray:
        """Array of shape ``[len(i) for i in index]``: ``member`` (``data`` or ``traj``) of the
        readouts the selection needs, placed."""
        traj = member == "traj"
        full = self._traj_shape if traj else self.full_shape
        col, second, loops = index[0], index[1], index[2:]
        uniq = [np.unique(i) for i in loops]
        wanted = np.ones(len(self), bool)
        pos = np.empty_like(self._counters)
        for k, (u, size) in enumerate(zip(uniq, full[2:], strict=True)):
            wanted &= np.isin(self._counters[:, k], u)
            lut = np.full(size, -1, np.int64)
            lut[u] = np.arange(len(u))
            pos[:, k] = lut[self._counters[:, k]]
        out = np.zeros((len(col), len(second), *map(len, uniq)), np.float32 if traj else np.complex64,
                       order="F")
        whole_col = np.array_equal(col, np.arange(full[0]))
        whole_second = np.array_equal(second, np.arange(full[1]))
        selected = np.flatnonzero(wanted)
        dest = None
        if not traj and whole_col and whole_second and not self.remove_os and out.size:
            dest = _slots(out, pos[selected])
        for i, ro in zip(selected, self._scan._readouts(self.rows[selected], member, dest), strict=True):
            if ro is None:  # read into its place
                continue
            ro = self._fit(ro.T if traj else ro, traj)
            if not whole_second:
                ro = ro[second]
            if not whole_col:
                ro = ro[:, col]
            out[(slice(None), slice(None), *pos[i])] = ro.T
        for k, (wanted_at, u) in enumerate(zip(loops, uniq, strict=True)):
            if not np.array_equal(wanted_at, u):  # reordered or repeated: expand from the unique ones
                out = np.take(out, np.searchsorted(u, wanted_at), axis=k + 2)
        return out

    def _fit(self, ro: np.ndarray, traj: bool = False) -> np.ndarray:
        """One readout (Cha, Col), or trajectory (Dim, Col), brought to the part's full size
        (zero-padded), OS removed from samples when asked."""
        n_col, n_second = (self._traj_shape if traj else self._full_shape)[:2]
        if ro.shape != (n_second, n_col):
            padded = np.zeros((n_second, n_col), ro.dtype)
            padded[: ro.shape[0], : ro.shape[1]] = ro
            ro = padded
        if self.remove_os and not traj:
            img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(ro, axes=-1), axis=-1), axes=-1)
            img = img[:, n_col // 4: n_col // 4 + n_col // 2]
            ro = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img, axes=-1), axis=-1), axes=-1)
        return ro.astype(np.float32 if traj else np.complex64, copy=False)


class TwixTrajectory(_Indexed):
    """The trajectories of a part's readouts (``part.traj``), indexed as the part is, by
    :data:`TRAJ_DIMS`: ``traj[:, :, lin]``, ``traj.select(Lin=3, Dim=0)``. float32, Fortran order."""

    def __init__(self, part: TwixPart) -> None:
        self.name = f"{part.name}.traj"
        self._part = part

    def __repr__(self) -> str:
        sizes = dict(zip(self.dims, self.shape, strict=True))
        return f"<TwixTrajectory {self.name}: {sizes}>"

    @property
    def full_dims(self) -> tuple[str, ...]:
        return TRAJ_DIMS

    @property
    def full_shape(self) -> tuple[int, ...]:
        return self._part._traj_shape

    @property
    def squeeze(self) -> bool:
        return self._part.squeeze

    def _read(self, index: list[np.ndarray]) -> np.ndarray:
        return self._part._place(index, "traj")


def _slots(out: np.ndarray, pos: np.ndarray) -> Dest:
    """``dest`` for :meth:`MrdFile.read`: the i-th readout's place in ``out`` (Fortran order, Col ×
    Cha × loops) at the loop positions ``pos[i]``, a C-contiguous (Cha, Col) view; ``None`` for a
    readout of another size."""
    n_col, n_cha = out.shape[:2]
    n = n_col * n_cha
    flat = out.reshape(-1, order="F")  # a view: out is Fortran-contiguous
    starts = np.ravel_multi_index(tuple(pos.T), out.shape[2:], order="F").astype(np.int64) * n

    def dest(i: int, shape: tuple[int, int]) -> np.ndarray | None:
        if shape != (n_cha, n_col):
            return None
        s = int(starts[i])
        return flat[s: s + n].reshape(shape)

    return dest


def _normalise(sel: Any, size: int, dim: str) -> np.ndarray:
    """An index of one dimension as an array of non-negative positions, bounds-checked."""
    if isinstance(sel, slice):
        return np.arange(size)[sel]
    idx = np.asarray(sel)
    if idx.dtype == bool:
        if idx.shape != (size,):
            raise TwixError(f"a boolean index of {dim} needs {size} elements, not {idx.shape}")
        return np.flatnonzero(idx)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TwixError(f"{dim} is indexed by integers, slices or booleans, not {sel!r}")
    idx = np.atleast_1d(idx).astype(np.int64)
    if idx.ndim != 1 or ((idx >= size) | (idx < -size)).any():
        raise TwixError(f"index {sel!r} is out of range for {dim} of size {size}")
    return np.where(idx < 0, idx + size, idx)


class TwixScan:
    """A raw MRD file seen as a twix scan: ``hdr`` (the mapped header), ``mrd_header`` (the parsed
    ismrmrd header), ``heads`` (every readout's acquisition header) and the parts by name.

    Indexing by name works as in twixtools (``scan['image']``, ``scan['hdr']``), attributes as in
    mapVBVD (``scan.image``, ``scan.hdr``). Close it (or use ``with``) to release the file.
    """

    def __init__(self, path: str | os.PathLike[str], param_map: ParameterMap | None = None,
                 dataset: str = "dataset") -> None:
        self.path = os.fspath(path)
        try:
            self._file = MrdFile(path, dataset)
        except MrdFileError as e:
            raise TwixError(str(e)) from e
        self.heads: np.ndarray = self._file.heads
        try:
            try:
                self.mrd_header: ismrmrd.xsd.ismrmrdHeader = self._file.header
            except MrdFileError as e:
                raise TwixError(str(e)) from e
            rows = sort_readouts(self.heads["flags"])
            self.parts = {name: TwixPart(name, self, rows[name]) for name in PARTS}
            ctx = ScanContext(self.mrd_header, self.heads, rows["image"], rows["refscan"])
            self.hdr: TwixHeader = (param_map or load_map()).apply(ctx)
        except Exception:
            self.close()
            raise

    def _readouts(self, rows: np.ndarray, member: str = "data", dest: Dest | None = None
                  ) -> Iterator[np.ndarray | None]:
        """``member`` of ``rows``: see :meth:`MrdFile.read`."""
        return self._file.read(rows, member, dest)

    def __getitem__(self, name: str) -> Any:
        if name == "hdr":
            return self.hdr
        try:
            return self.parts[name]
        except KeyError:
            raise KeyError(f"{name!r}: a scan has 'hdr' and the parts {PARTS}") from None

    def __getattr__(self, name: str) -> TwixPart:
        if name in PARTS and "parts" in self.__dict__:
            return self.parts[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        counts = ", ".join(f"{n}: {len(p)}" for n, p in self.parts.items() if len(p))
        return f"<TwixScan {os.path.basename(self.path)}: {counts}>"

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TwixScan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_twix(path: str | os.PathLike[str], param_map: ParameterMap | str | os.PathLike[str] | None = None,
              dataset: str = "dataset") -> TwixScan:
    """The twix-like scan of the raw MRD file ``path``.

    ``param_map``: a :class:`ParameterMap`, the path of a site map (merged onto the default map), or
    ``None`` for the default map. Raises ``ParameterMapError`` when a mandatory entry cannot be filled
    and ``TwixError`` when the file is not a raw MRD file.
    """
    if param_map is not None and not isinstance(param_map, ParameterMap):
        param_map = load_map(param_map)
    return TwixScan(path, param_map, dataset)
