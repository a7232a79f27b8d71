"""The parameter map: MRD header fields and user parameters → twix-like header entries.

A map is a YAML file::

    version: 1
    user_parameters: UserParameters   # group that receives every user parameter (null: none)
    drop: [Meas.alTI]                 # site maps: entries of the maps below to remove
    entries:
      Meas.lBaseResolution:           # <Group>.<Name>[.<Name> ...] in the twix-like header
        source: encoding[0].reconSpace.matrixSize.x   # or a list of sources, the first present wins
        type: int                     # int | float | str | bool | list[<type>]
        mandatory: true               # missing or ill-typed: ParameterMapError (default false)
      Meas.alTR:
        source: sequenceParameters.TR
        type: list[int]
        scale: 1000                   # value * scale + offset (ms → µs here)
        default: []                   # used when an optional source is missing or ill-typed
      Meas.ucTrajectory:
        source: encoding[0].trajectory
        type: int
        lookup: {cartesian: 1, radial: 2, spiral: 4}   # value → value, applied first

Sources are described in :mod:`reconq.parametermaps.sources`. A site map has the same format; its entries
are merged field by field into the default map's (a field set to ``null`` is removed), new entries
are added, and ``drop`` removes entries. Maps are validated when loaded.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ParameterMapError
from .sources import ScanContext, check_source, resolve

log = logging.getLogger(__name__)

MAP_VERSION = 1
_ENTRY_FIELDS = {"source", "type", "mandatory", "default", "scale", "offset", "lookup", "doc"}
_TOP_FIELDS = {"version", "user_parameters", "drop", "entries"}
_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_TYPE = re.compile(r"^(?:list\[(.+)\]|(int|float|str|bool))$")


class TwixHeader(dict):
    """A nested dict of header entries, also readable by attribute: ``hdr.Meas.lBaseResolution`` (as
    with mapVBVD) and ``hdr['Meas']['lBaseResolution']`` (as with twixtools) give the same value."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def set_path(self, dotted: str, value: Any) -> None:
        *groups, last = dotted.split(".")
        node = self
        for g in groups:
            node = node.setdefault(g, TwixHeader())
        node[last] = value


# --- types ---------------------------------------------------------------------------------------


def _check_type(spec: str) -> None:
    m = _TYPE.match(spec)
    if m is None:
        raise ValueError(f"unknown type {spec!r}: use int, float, str, bool or list[<type>]")
    if m.group(1):
        _check_type(m.group(1))


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def convert(value: Any, spec: str, scale: float = 1.0, offset: float = 0.0) -> Any:
    """``value`` as type ``spec``, numbers first scaled (``value * scale + offset``).

    Raises ``TypeError`` where the value does not have that type (text for a number, 2.5 for an int).
    """
    m = _TYPE.match(spec)
    assert m is not None
    if m.group(1):
        items = value if isinstance(value, list | tuple) else [value]
        return [convert(v, m.group(1), scale, offset) for v in items]
    if _is_num(value) and (scale != 1.0 or offset != 0.0):
        value = value * scale + offset
    kind = m.group(2)
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"{value!r} is not text")
        return value
    if kind == "bool":
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise TypeError(f"{value!r} is not a boolean")
    if not _is_num(value):
        raise TypeError(f"{value!r} is not a number")
    if kind == "float":
        return float(value)
    if not math.isfinite(value) or abs(value - round(value)) > 1e-6 * max(1.0, abs(value)):
        raise TypeError(f"{value!r} is not an integer")
    return int(round(value))


# --- entries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapEntry:
    """One twix-like header entry: where its value comes from and what it must be."""

    name: str
    sources: tuple[str, ...]
    type: str
    mandatory: bool = False
    default: Any = None
    scale: float = 1.0
    offset: float = 0.0
    lookup: Mapping[Any, Any] | None = None
    map_file: str | None = None

    @classmethod
    def from_dict(cls, name: str, spec: Any, map_file: str | None = None) -> MapEntry:
        known_field: list[str] = []  # the entry's sources, once known, name the field in errors

        def fail(message: str, field: str | None = None) -> ParameterMapError:
            field = field or (" or ".join(known_field) if known_field else None)
            return ParameterMapError(message, entry=name, field=field, map_file=map_file)

        if not isinstance(spec, Mapping):
            raise fail(f"an entry is a mapping of {sorted(_ENTRY_FIELDS)}, not {type(spec).__name__}")
        if spec.get("source") is None:
            raise fail("'source' is missing")
        sources = spec["source"] if isinstance(spec["source"], list) else [spec["source"]]
        known_field.extend(map(str, sources))
        if not _NAME.match(name):
            raise fail("an entry name is <Group>.<Name> made of identifiers, e.g. Meas.lBaseResolution")
        unknown = set(spec) - _ENTRY_FIELDS
        if unknown:
            raise fail(f"unknown fields {sorted(unknown)}; allowed: {sorted(_ENTRY_FIELDS)}")
        if spec.get("type") is None:
            raise fail("'type' is missing")
        for source in sources:
            if not isinstance(source, str):
                raise fail(f"a source is text, not {source!r}")
            try:
                check_source(source)
            except ValueError as e:
                raise fail(str(e), field=source) from e
        try:
            _check_type(str(spec["type"]))
        except ValueError as e:
            raise fail(str(e)) from e
        mandatory = spec.get("mandatory", False)
        if not isinstance(mandatory, bool):
            raise fail(f"'mandatory' is true or false, not {mandatory!r}")
        for key in ("scale", "offset"):
            if key in spec and not _is_num(spec[key]):
                raise fail(f"{key!r} is a number, not {spec[key]!r}")
        lookup = spec.get("lookup")
        if lookup is not None and not isinstance(lookup, Mapping):
            raise fail(f"'lookup' is a mapping, not {lookup!r}")
        default = spec.get("default")
        if mandatory and default is not None:
            raise fail("a mandatory entry takes no default")
        entry = cls(
            name=name,
            sources=tuple(sources),
            type=str(spec["type"]),
            mandatory=mandatory,
            default=default,
            scale=float(spec.get("scale", 1.0)),
            offset=float(spec.get("offset", 0.0)),
            lookup=dict(lookup) if lookup is not None else None,
            map_file=map_file,
        )
        if default is not None:
            try:
                convert(default, entry.type)
            except TypeError as e:
                raise fail(f"the default does not have type {entry.type}: {e}") from e
        return entry

    def value(self, ctx: ScanContext) -> Any:
        """This entry's value for the scan in ``ctx``; the default (or ``None``) where it is missing."""
        source, raw = next(((s, v) for s in self.sources if (v := resolve(s, ctx)) is not None), (None, None))
        if raw is None:
            if self.mandatory:
                raise ParameterMapError(
                    "mandatory field is missing from the MRD header",
                    entry=self.name, field=" or ".join(self.sources), map_file=self.map_file,
                )
            return self.default
        try:
            if self.lookup is not None:
                if raw not in self.lookup:
                    raise TypeError(f"{raw!r} is not one of {sorted(map(str, self.lookup))}")
                raw = self.lookup[raw]
            return convert(raw, self.type, self.scale, self.offset)
        except TypeError as e:
            if self.mandatory:
                raise ParameterMapError(
                    f"mandatory field does not have type {self.type}: {e}",
                    entry=self.name, field=source, map_file=self.map_file,
                ) from e
            log.warning("map entry %s: field %s ill-typed (%s); using the default", self.name, source, e)
            return self.default


# --- maps ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterMap:
    """A validated map: its entries by twix-like name, and the group receiving every user parameter."""

    entries: Mapping[str, MapEntry]
    user_parameters: str | None = "UserParameters"
    raw: Mapping[str, Mapping[str, Any]] | None = None  # the merged entry specs, for further merging

    @classmethod
    def from_dict(
        cls, doc: Any, map_file: str | None = None, base: ParameterMap | None = None
    ) -> ParameterMap:
        """The map described by ``doc`` (a parsed YAML document), merged onto ``base`` if given."""
        if not isinstance(doc, Mapping):
            raise ParameterMapError("a map is a mapping with 'entries'", map_file=map_file)
        unknown = set(doc) - _TOP_FIELDS
        if unknown:
            raise ParameterMapError(f"unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_FIELDS)}",
                                    map_file=map_file)
        if doc.get("version", MAP_VERSION) != MAP_VERSION:
            raise ParameterMapError(f"version {doc.get('version')!r} is not {MAP_VERSION}", map_file=map_file)
        entries = doc.get("entries") or {}
        if not isinstance(entries, Mapping):
            raise ParameterMapError("'entries' is a mapping of entry name to entry", map_file=map_file)
        specs: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (base.raw or {}).items()} if base else {}
        files = {k: e.map_file for k, e in base.entries.items()} if base else {}
        for name in doc.get("drop") or []:
            if name not in specs:
                raise ParameterMapError("'drop' names an entry no map below defines", entry=name,
                                        map_file=map_file)
            del specs[name], files[name]
        for name, spec in entries.items():
            if not isinstance(spec, Mapping):
                raise ParameterMapError("an entry is a mapping", entry=str(name), map_file=map_file)
            merged = {**specs.get(name, {}), **spec}
            specs[name] = {k: v for k, v in merged.items() if v is not None}
            files[name] = map_file
        built = {name: MapEntry.from_dict(name, spec, files[name]) for name, spec in specs.items()}
        _check_no_clash(built, map_file)
        group = doc.get("user_parameters", base.user_parameters if base else "UserParameters")
        if group is not None and (not isinstance(group, str) or not group.isidentifier()):
            raise ParameterMapError(f"'user_parameters' is a group name or null, not {group!r}",
                                    map_file=map_file)
        return cls(entries=built, user_parameters=group, raw=specs)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], base: ParameterMap | None = None) -> ParameterMap:
        """The map in the YAML file ``path``, merged onto ``base`` if given."""
        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ParameterMapError(f"cannot read the map: {e}", map_file=str(path)) from e
        return cls.from_dict(doc, map_file=str(path), base=base)

    def extended(self, site: str | os.PathLike[str] | Mapping[str, Any]) -> ParameterMap:
        """This map with a site map (a file or a parsed document) merged on top."""
        if isinstance(site, Mapping):
            return ParameterMap.from_dict(site, map_file="<site map>", base=self)
        return ParameterMap.from_file(site, base=self)

    def apply(self, ctx: ScanContext) -> TwixHeader:
        """The twix-like header of the scan in ``ctx``; ``ParameterMapError`` for a mandatory entry the
        scan cannot fill. Optional entries with neither value nor default are left out."""
        hdr = TwixHeader()
        for name, entry in self.entries.items():
            value = entry.value(ctx)
            if value is not None:
                hdr.set_path(name, value)
        if self.user_parameters is not None:
            group = hdr.setdefault(self.user_parameters, TwixHeader())
            for name, value in ctx.user_parameters.items():
                group.setdefault(name, value)
        return hdr


def _check_no_clash(entries: Mapping[str, MapEntry], map_file: str | None) -> None:
    """An entry may not be both a value and a group of others (``Meas.a`` and ``Meas.a.b``)."""
    names = set(entries)
    for name in names:
        parts = name.split(".")
        for i in range(2, len(parts)):
            if ".".join(parts[:i]) in names:
                raise ParameterMapError(f"clashes with entry {'.'.join(parts[:i])!r}", entry=name,
                                        field=" or ".join(entries[name].sources), map_file=map_file)


def default_map() -> ParameterMap:
    """The map shipped with the package (``parametermaps/default_map.yaml``)."""
    ref = resources.files(__package__).joinpath("default_map.yaml")
    doc = yaml.safe_load(ref.read_text(encoding="utf-8"))
    return ParameterMap.from_dict(doc, map_file="default_map.yaml")


def load_map(
    site_maps: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
) -> ParameterMap:
    """The default map, extended by the site map file(s) a setting points at (in order)."""
    pmap = default_map()
    if site_maps is None:
        return pmap
    paths = [site_maps] if isinstance(site_maps, str | os.PathLike) else list(site_maps)
    for path in paths:
        pmap = pmap.extended(path)
    return pmap
