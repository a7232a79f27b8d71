"""Mapping of the MRD header and acquisitions into a twix-like structure (pure library).

- :mod:`reconq.parametermaps.mapping`: the declarative map (``default_map.yaml`` plus site maps) and the
  twix-like header it builds;
- :mod:`reconq.parametermaps.sources`: where a map entry's value comes from (header paths, user parameters,
  readout headers, derived quantities);
- :mod:`reconq.parametermaps.twix`: ``read_twix``, the lazily read twix-like scan and its parts.

Raw files are read through the foundation's MRD reader, :mod:`reconq.core.mrdfile`, the only module of
ReconQ this package imports.
"""

from .errors import ParameterMapError, TwixError
from .mapping import MapEntry, ParameterMap, TwixHeader, default_map, load_map
from .twix import DIMS, PARTS, TRAJ_DIMS, TwixPart, TwixScan, TwixTrajectory, read_twix

__all__ = [
    "DIMS", "PARTS", "TRAJ_DIMS", "MapEntry", "ParameterMap", "ParameterMapError", "TwixError", "TwixHeader",
    "TwixPart", "TwixScan", "TwixTrajectory", "default_map", "load_map", "read_twix",
]
