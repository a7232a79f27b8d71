"""The exception family of ``parametermaps``."""

from __future__ import annotations


class ParameterMapError(Exception):
    """A parameter map that is malformed, or that an MRD header cannot satisfy.

    ``entry`` is the twix-like name of the map entry (``Meas.lBaseResolution``), ``field`` the MRD
    source it reads (``encoding[0].reconSpace.matrixSize.x``) and ``map_file`` the file the entry
    was last defined in; each is ``None`` where it does not apply.
    """

    def __init__(
        self, message: str, *, entry: str | None = None, field: str | None = None, map_file: str | None = None
    ) -> None:
        where = []
        if entry is not None:
            where.append(f"map entry {entry!r}")
        if field is not None:
            where.append(f"field {field!r}")
        if map_file is not None:
            where.append(f"in {map_file}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.entry = entry
        self.field = field
        self.map_file = map_file


class TwixError(Exception):
    """A raw MRD file that cannot be read as a twix-like scan, or a selection that does not fit it."""
