"""Where a map entry's value comes from: the MRD XML header, a user parameter, a readout header or a
quantity derived from them.

A source is one string:

- ``encoding[0].encodedSpace.matrixSize.x``: a dotted path into ``ismrmrd.xsd.ismrmrdHeader``; ``[i]``
  picks one element of a list, a path ending at a list gives the whole list;
- ``user.<name>``: the user parameter ``<name>`` (long, double or string);
- ``acq.<field>``: a field of the first image readout's acquisition header (``acq.sample_time_us``,
  ``acq.idx.kspace_encode_step_1``);
- ``derived.<name>``: one of :data:`DERIVED` (oversampling and partial Fourier factors, reference
  lines, slice positions, bandwidth per pixel).

Paths are checked against the ismrmrd schema when a map is loaded, so a typo fails on load.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ismrmrd
import ismrmrd.hdf5
import ismrmrd.xsd
import numpy as np

_SEGMENT = re.compile(r"^([A-Za-z_]\w*)(?:\[(\d+)\])?$")
_HEAD_DTYPE = ismrmrd.hdf5.acquisition_header_dtype


@dataclass(frozen=True)
class ScanContext:
    """What a source is resolved against: the parsed header and, where known, the readout headers.

    ``heads`` holds every readout's acquisition header (``acquisition_header_dtype``), ``image_rows``
    and ``refscan_rows`` index it; ``None`` where only the XML header is known.
    """

    header: ismrmrd.xsd.ismrmrdHeader
    heads: np.ndarray | None = None
    image_rows: np.ndarray | None = None
    refscan_rows: np.ndarray | None = None

    @functools.cached_property
    def first_image_head(self) -> np.void | None:
        if self.heads is None or len(self.heads) == 0:
            return None
        rows = self.image_rows if self.image_rows is not None and len(self.image_rows) else None
        return self.heads[rows[0]] if rows is not None else self.heads[0]

    @functools.cached_property
    def user_parameters(self) -> dict[str, Any]:
        return user_parameters(self.header)


def user_parameters(header: ismrmrd.xsd.ismrmrdHeader) -> dict[str, Any]:
    """Every user parameter of ``header`` by name (long → int, double → float, string → str)."""
    params = header.userParameters
    if params is None:
        return {}
    out: dict[str, Any] = {}
    for p in params.userParameterLong:
        out[p.name] = int(p.value)
    for p in params.userParameterDouble:
        out[p.name] = float(p.value)
    for p in params.userParameterString:
        out[p.name] = str(p.value)
    for p in params.userParameterBase64:
        out[p.name] = str(p.value)
    return out


# --- checking a source on load -------------------------------------------------------------------


def check_source(source: str) -> None:
    """Raise ``ValueError`` saying why ``source`` cannot name a value (an unknown field or name)."""
    kind, _, rest = source.partition(".")
    if kind == "user":
        if not rest:
            raise ValueError("'user.' needs a parameter name")
    elif kind == "acq":
        _check_acq_field(rest)
    elif kind == "derived":
        if rest not in DERIVED:
            raise ValueError(f"unknown derived quantity {rest!r}; known: {', '.join(sorted(DERIVED))}")
    else:
        _check_header_path(source)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """``(inner type, is_list)`` of ``X``, ``X | None``, ``list[X]`` or ``None | list[X]``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else Any
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _check_header_path(path: str) -> None:
    cls: Any = ismrmrd.xsd.ismrmrdHeader
    for segment in path.split("."):
        m = _SEGMENT.match(segment)
        if m is None:
            raise ValueError(f"bad path segment {segment!r}")
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"{segment!r} follows a value that has no fields")
        hints = typing.get_type_hints(cls)
        if m.group(1) not in hints:
            raise ValueError(f"{_name(cls)} has no field {m.group(1)!r}; it has {', '.join(hints)}")
        cls, is_list = _unwrap(hints[m.group(1)])
        if m.group(2) is not None and not is_list:
            raise ValueError(f"{m.group(1)!r} is not a list, it cannot take [{m.group(2)}]")
    if dataclasses.is_dataclass(cls):
        raise ValueError(f"the path ends at a structure ({_name(cls)}), not a value")


def _name(cls: Any) -> str:
    return str(getattr(cls, "__name__", cls))


def _check_acq_field(field: str) -> None:
    dtype = _HEAD_DTYPE
    for name in field.split("."):
        if dtype.names is None or name not in dtype.names:
            raise ValueError(f"the acquisition header has no field {field!r}")
        dtype = dtype.fields[name][0]
    if dtype.names is not None:
        raise ValueError(f"acquisition header field {field!r} is a structure, not a value")


# --- resolving a source --------------------------------------------------------------------------


def resolve(source: str, ctx: ScanContext) -> Any:
    """The value ``source`` names in ``ctx``, or ``None`` where the scan does not hold it."""
    kind, _, rest = source.partition(".")
    if kind == "user":
        return ctx.user_parameters.get(rest)
    if kind == "acq":
        head = ctx.first_image_head
        if head is None:
            return None
        value: Any = head
        for name in rest.split("."):
            value = value[name]
        return value.tolist() if isinstance(value, np.ndarray | np.generic) else value
    if kind == "derived":
        return DERIVED[rest](ctx)
    return _resolve_header_path(source, ctx.header)


def _resolve_header_path(path: str, header: Any) -> Any:
    value = header
    for segment in path.split("."):
        m = _SEGMENT.match(segment)
        assert m is not None  # checked on load
        value = getattr(value, m.group(1), None)
        if m.group(2) is not None:
            i = int(m.group(2))
            value = value[i] if value is not None and i < len(value) else None
        if value is None:
            return None
    if isinstance(value, list) and not value:
        return None
    return plain(value)


def plain(value: Any) -> Any:
    """``value`` as plain Python: enums by their value, dates and times as ISO text, numpy as Python."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)  # xsdata XmlDate / XmlTime and the like


# --- derived quantities --------------------------------------------------------------------------


def _enc(ctx: ScanContext) -> Any:
    return ctx.header.encoding[0] if ctx.header.encoding else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else float(num) / float(den)


def _readout_oversampling(ctx: ScanContext) -> float | None:
    enc = _enc(ctx)
    return enc and _ratio(enc.encodedSpace.matrixSize.x, enc.reconSpace.matrixSize.x)


def _fov_oversampling(axis: str) -> Callable[[ScanContext], float | None]:
    def oversampling(ctx: ScanContext) -> float | None:
        enc = _enc(ctx)
        if enc is None:
            return None
        encoded, recon = enc.encodedSpace.fieldOfView_mm, enc.reconSpace.fieldOfView_mm
        r = _ratio(getattr(encoded, axis), getattr(recon, axis))
        return None if r is None else r - 1.0

    return oversampling


def _partial_fourier(step: str, axis: str) -> Callable[[ScanContext], float | None]:
    """Fraction of k-space sampled along an encoding step: (maximum - minimum + 1) / encoded size."""

    def fraction(ctx: ScanContext) -> float | None:
        enc = _enc(ctx)
        limit = enc and getattr(enc.encodingLimits, step)
        if limit is None:
            return None
        size = getattr(enc.encodedSpace.matrixSize, axis)
        return _ratio(limit.maximum - limit.minimum + 1, size)

    return fraction


def _readout_partial_fourier(ctx: ScanContext) -> float | None:
    """Asymmetric echo: samples / (2 × samples after the echo centre); 1.0 for a centred echo."""
    head = ctx.first_image_head
    if head is None or not head["center_sample"]:
        return None
    n, c = int(head["number_of_samples"]), int(head["center_sample"])
    return min(1.0, n / (2.0 * (n - c)))


def _bandwidth_per_pixel(ctx: ScanContext) -> float | None:
    head = ctx.first_image_head
    if head is None or not head["sample_time_us"]:
        return None
    return 1e6 / (float(head["sample_time_us"]) * int(head["number_of_samples"]))


def _ref_lines(counter: str) -> Callable[[ScanContext], int | None]:
    def count(ctx: ScanContext) -> int | None:
        if ctx.heads is None or ctx.refscan_rows is None or not len(ctx.refscan_rows):
            return None
        return int(np.unique(ctx.heads["idx"][counter][ctx.refscan_rows]).size)

    return count


def _slice_positions(ctx: ScanContext) -> list[list[float]] | None:
    """Per slice counter (0, 1, ...): the ``position`` of its first image readout, in mm."""
    if ctx.heads is None or ctx.image_rows is None or not len(ctx.image_rows):
        return None
    heads = ctx.heads[ctx.image_rows]
    sli = heads["idx"]["slice"]
    out = np.full((int(sli.max()) + 1, 3), np.nan)
    first = np.unique(sli, return_index=True)
    out[first[0]] = heads["position"][first[1]]
    return out.tolist()


def _slice_normal(ctx: ScanContext) -> list[float] | None:
    head = ctx.first_image_head
    return None if head is None else head["slice_dir"].tolist()


#: ``derived.<name>`` sources and how each is computed.
DERIVED: dict[str, Callable[[ScanContext], Any]] = {
    "readout_oversampling": _readout_oversampling,
    "phase_oversampling": _fov_oversampling("y"),
    "slice_oversampling": _fov_oversampling("z"),
    "phase_partial_fourier": _partial_fourier("kspace_encoding_step_1", "y"),
    "slice_partial_fourier": _partial_fourier("kspace_encoding_step_2", "z"),
    "readout_partial_fourier": _readout_partial_fourier,
    "bandwidth_per_pixel": _bandwidth_per_pixel,
    "ref_lines_pe": _ref_lines("kspace_encode_step_1"),
    "ref_lines_3d": _ref_lines("kspace_encode_step_2"),
    "slice_positions": _slice_positions,
    "slice_normal": _slice_normal,
}
