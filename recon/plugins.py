"""Offline recon code as inline pipelines.

A physicist's function ``recon(twix, params, progress)``, written against the twix-like object of
:mod:`reconq.parametermaps`, becomes a pipeline that configs can name. It is registered either

- through a Python entry point in the group ``reconq.pipelines`` (``name = "package.module:recon"``), or
- as a ``*.py`` file in the folder ``RECONQ_PLUGIN_DIR``: the file defines ``recon`` and optionally
  ``PIPELINE_NAME`` (default: the file name without ``.py``). Files whose names start with ``_`` are
  skipped (helpers the plugin imports).

Only registered names run, and a plugin may not take the name of a built-in pipeline. The function
returns its images as an array ``(nimg, ny, nx)`` (or ``(ny, nx)``), x = readout = columns, real or
complex, numpy or cupy: one image per slice (2D), or per partition (3D). ReconQ turns them into images
in the scanner's conventions, with the geometry of the scan's centre readouts. A :class:`PluginOutput`
may carry a series description and index as well.

Beside ``recon``, the plugin's module (the file, or the module the entry point names) may declare the
other hooks of the pipeline contract (:class:`reconq.recon.pipeline.Pipeline`), as module-level names:

- ``memory_estimate(header, params) -> int | None``: GPU memory in bytes at the recon's peak, from the
  parsed MRD header (``ismrmrd.xsd.ismrmrdHeader``) and the job's parameters; ``None``: the generic
  header-based model;
- ``runtime_estimate(header, params) -> float | None``: expected seconds on a GPU; ``None``: the history
  of earlier runs;
- ``CPU_CAPABLE = False``: the recon needs a GPU (default ``True``: CPU workers may run it).

The estimates are called where the job is placed (the gateway, the API, or a worker), before the raw
file is read: they must use the header alone. A ``gpu_memory_gb`` or ``expected_seconds`` job
parameter still overrides them.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import ismrmrd
import ismrmrd.xsd
import numpy as np

from reconq.parametermaps import ParameterMap, load_map, read_twix
from reconq.recon.errors import ReconError
from reconq.recon.images import ImageGeometry, to_mrd_images
from reconq.recon.pipeline import Pipeline, ProgressFn
from reconq.recon.rawdata import RawScan
from reconq.recon.registry import pipeline_names, register

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "reconq.pipelines"
PluginFn = Callable[[Any, dict[str, Any], ProgressFn], Any]
#: ``memory_estimate`` (bytes) or ``runtime_estimate`` (seconds) of a plugin module: (header, params).
EstimateFn = Callable[[ismrmrd.xsd.ismrmrdHeader, Mapping[str, Any]], Any]


class PluginError(ReconError):
    """A plugin cannot be loaded, or returned something that is not images."""


@dataclass
class PluginOutput:
    """What a plugin may return instead of a bare array."""

    images: Any  # (nimg, ny, nx) or (ny, nx), numpy or cupy, real or complex
    description: str | None = None
    series_index: int = 1


@dataclass(frozen=True)
class PluginSpec:
    """A plugin as found: its name, its ``recon`` function, where it came from, and its declared hooks."""

    name: str
    recon: PluginFn
    source: str  # "file x.py" or "entry point package.module:recon"
    memory_estimate: EstimateFn | None = None
    runtime_estimate: EstimateFn | None = None
    cpu_capable: bool = True


class PluginPipeline(Pipeline):
    """Runs a twix-style ``recon`` function on a stored scan and makes scanner images of its output; its
    estimates and ``cpu_capable`` are those its module declares (see the module docstring)."""

    def __init__(self, spec: PluginSpec, param_map: ParameterMap | None = None) -> None:
        self.spec, self.param_map = spec, param_map
        self.name, self.cpu_capable = spec.name, spec.cpu_capable

    def memory_estimate(self, header: ismrmrd.xsd.ismrmrdHeader, params: Mapping[str, Any]) -> int | None:
        value = self._call("memory_estimate", self.spec.memory_estimate, header, params)
        return None if value is None else int(value)

    def runtime_estimate(self, header: ismrmrd.xsd.ismrmrdHeader, params: Mapping[str, Any]) -> float | None:
        value = self._call("runtime_estimate", self.spec.runtime_estimate, header, params)
        return None if value is None else float(value)

    def _call(self, hook: str, fn: EstimateFn | None, header: ismrmrd.xsd.ismrmrdHeader,
              params: Mapping[str, Any]) -> float | None:
        """The plugin's ``hook``, or None where it declares none; its failures are PluginErrors naming it."""
        if fn is None:
            return None
        try:
            value = fn(header, dict(params))
            return None if value is None else float(value)
        except Exception as e:  # plugin code may fail in any way: the job's error names the hook
            raise PluginError(f"plugin {self.name}: {hook} failed: {type(e).__name__}: {e}") from e

    def run(self, scan: RawScan, params: Mapping[str, Any], progress: ProgressFn) -> list[ismrmrd.Image]:
        progress(0.0, "reading")
        with read_twix(scan.path, self.param_map) as twix:
            out = self.spec.recon(twix, dict(params), lambda f, s: progress(0.05 + 0.9 * f, s))
        if not isinstance(out, PluginOutput):
            out = PluginOutput(images=out)
        mag = magnitude_stack(out.images, self.name)
        progress(0.95, "images")
        geometry = plugin_geometry(scan, mag.shape[0])
        return to_mrd_images(mag, geometry, scan.header, series_index=out.series_index,
                             description=out.description or self.name,
                             history=("RECONQ", f"plugin {self.name}"))


def magnitude_stack(images: Any, name: str) -> np.ndarray:
    """``(nimg, ny, nx)`` float32 magnitudes on the host from a plugin's array."""
    if hasattr(images, "get"):  # a cupy array
        images = images.get()
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.number):
        raise PluginError(f"plugin {name} returned {arr.dtype} {arr.shape}: need images shaped (nimg, ny, nx)")
    return np.abs(arr).astype(np.float32)


def plugin_geometry(scan: RawScan, nimg: int) -> list[ImageGeometry]:
    """One geometry per image: the centre readout of each slice (2D) or each partition's place (3D)."""
    enc = scan.header.encoding[0]
    limits = enc.encodingLimits
    centre = limits.kspace_encoding_step_1.center if limits.kspace_encoding_step_1 else 0
    heads = scan.heads
    nslices = int(heads["idx"]["slice"].max()) + 1 if len(heads) else 1
    by_slice = []
    for s in range(nslices):
        rows = np.flatnonzero(heads["idx"]["slice"] == s)
        if rows.size == 0:
            raise PluginError(f"scan has no readouts for slice {s}")
        at_centre = rows[heads["idx"]["kspace_encode_step_1"][rows] == centre]
        by_slice.append(heads[at_centre[0] if at_centre.size else rows[rows.size // 2]])
    nz = int(enc.reconSpace.matrixSize.z or 1)
    if nz > 1 and nslices == 1 and nimg == nz:
        head = by_slice[0]
        thickness = float(enc.reconSpace.fieldOfView_mm.z) / nz
        pos, sdir = np.asarray(head["position"], float), np.asarray(head["slice_dir"], float)
        return [ImageGeometry.from_head(head, position=tuple(pos + (p - nz // 2) * thickness * sdir), slice=p)
                for p in range(nz)]
    if nimg % nslices:
        raise PluginError(f"{nimg} images for {nslices} slices: return one image per slice (or per partition)")
    return [ImageGeometry.from_head(by_slice[i % nslices]) for i in range(nimg)]


def _import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"reconq_plugin_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import plugin file {path.name}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise PluginError(f"plugin file {path.name} failed to import: {type(e).__name__}: {e}") from e
    return module


def plugin_spec(name: str, func: Any, module: ModuleType | None, source: str) -> PluginSpec:
    """The plugin ``name`` with its ``recon`` function and the hooks its ``module`` declares, checked."""
    if not callable(func):
        raise PluginError(f"plugin {source} defines no function recon(twix, params, progress)")
    hooks: dict[str, EstimateFn | None] = {}
    for hook in ("memory_estimate", "runtime_estimate"):
        fn = getattr(module, hook, None)
        if fn is not None and not callable(fn):
            raise PluginError(f"plugin {source}: {hook} must be a function (header, params)")
        hooks[hook] = fn
    cpu_capable = getattr(module, "CPU_CAPABLE", True)
    if not isinstance(cpu_capable, bool):
        raise PluginError(f"plugin {source}: CPU_CAPABLE must be True or False, not {cpu_capable!r}")
    return PluginSpec(name, func, source, hooks["memory_estimate"], hooks["runtime_estimate"], cpu_capable)


def _from_file(path: Path) -> PluginSpec:
    module = _import_file(path)
    name = str(getattr(module, "PIPELINE_NAME", path.stem))
    return plugin_spec(name, getattr(module, "recon", None), module, f"file {path.name}")


def discover(folder: Path | None) -> list[PluginSpec]:
    """Every plugin from entry points and ``folder``."""
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        func = ep.load()
        found.append(plugin_spec(ep.name, func, inspect.getmodule(func), f"entry point {ep.value}"))
    if folder is not None:
        if not folder.is_dir():
            raise PluginError(f"plugin folder {folder} does not exist")
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                found.append(_from_file(path))
    return found


_loaded: dict[str, str] = {}


def load_plugins(folder: Path | None = None, site_map: Path | None = None) -> list[str]:
    """Register every plugin as a pipeline; returns their names. A plugin may not shadow a built-in."""
    param_map = load_map(site_map) if site_map is not None else None
    names = []
    for spec in discover(folder):
        if spec.name in pipeline_names() and _loaded.get(spec.name) != spec.source:
            raise PluginError(f"plugin {spec.name!r} ({spec.source}) would replace an existing pipeline of that name")
        register(PluginPipeline(spec, param_map))
        _loaded[spec.name] = spec.source
        names.append(spec.name)
        log.info("plugin pipeline %s registered from %s%s", spec.name, spec.source,
                 "" if spec.cpu_capable else " (GPU only)")
    return names
