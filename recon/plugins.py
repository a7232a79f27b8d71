"""Offline recon code as inline pipelines.

A physicist's function ``recon(twix, params, progress)``, written against the twix-like object of
:mod:`reconq.parametermaps`, becomes a pipeline that configs can name. It is registered either

- through a Python entry point in the group ``reconq.pipelines`` (``name = "package.module:recon"``), or
- as a ``*.py`` file in the folder ``RECONQ_PLUGIN_DIR``: the file defines ``recon`` and optionally
  ``PIPELINE_NAME`` (default: the file name without ``.py``).

Only registered names run. The function returns its images as an array ``(nimg, ny, nx)`` (or
``(ny, nx)``), x = readout = columns, real or complex, numpy or cupy: one image per slice (2D), or per
partition (3D). ReconQ turns them into images in the scanner's conventions, with the geometry of the
scan's centre readouts. A :class:`PluginOutput` may carry a series description and index as well.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import ismrmrd
import numpy as np

from reconq.parametermaps import ParameterMap, load_map, read_twix
from reconq.recon.errors import ReconError
from reconq.recon.images import ImageGeometry, to_mrd_images
from reconq.recon.pipelines import ProgressFn, pipeline_names, register
from reconq.recon.rawdata import RawScan

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "reconq.pipelines"
PluginFn = Callable[[Any, dict[str, Any], ProgressFn], Any]


class PluginError(ReconError):
    """A plugin cannot be loaded, or returned something that is not images."""


@dataclass
class PluginOutput:
    """What a plugin may return instead of a bare array."""

    images: Any  # (nimg, ny, nx) or (ny, nx), numpy or cupy, real or complex
    description: str | None = None
    series_index: int = 1


class PluginPipeline:
    """Runs a twix-style ``recon`` function on a stored scan and makes scanner images of its output."""

    def __init__(self, name: str, func: PluginFn, source: str, param_map: ParameterMap | None = None) -> None:
        self.name = name
        self.func = func
        self.source = source
        self.param_map = param_map

    def run(self, scan: RawScan, params: Mapping[str, Any], progress: ProgressFn) -> list[ismrmrd.Image]:
        progress(0.0, "reading")
        with read_twix(scan.path, self.param_map) as twix:
            out = self.func(twix, dict(params), lambda f, s: progress(0.05 + 0.9 * f, s))
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


def _from_file(path: Path) -> tuple[str, PluginFn]:
    spec = importlib.util.spec_from_file_location(f"reconq_plugin_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import plugin file {path.name}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise PluginError(f"plugin file {path.name} failed to import: {type(e).__name__}: {e}") from e
    func = getattr(module, "recon", None)
    if not callable(func):
        raise PluginError(f"plugin file {path.name} defines no function recon(twix, params, progress)")
    return str(getattr(module, "PIPELINE_NAME", path.stem)), func


def discover(folder: Path | None) -> list[tuple[str, PluginFn, str]]:
    """(name, function, source) of every plugin from entry points and ``folder``."""
    found = [(ep.name, ep.load(), f"entry point {ep.value}") for ep in entry_points(group=ENTRY_POINT_GROUP)]
    if folder is not None:
        if not folder.is_dir():
            raise PluginError(f"plugin folder {folder} does not exist")
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                name, func = _from_file(path)
                found.append((name, func, f"file {path.name}"))
    return found


_loaded: dict[str, str] = {}


def load_plugins(folder: Path | None = None, site_map: Path | None = None) -> list[str]:
    """Register every plugin as a pipeline; returns their names. A plugin may not shadow a built-in."""
    param_map = load_map(site_map) if site_map is not None else None
    names = []
    for name, func, source in discover(folder):
        if name in pipeline_names() and _loaded.get(name) != source:
            raise PluginError(f"plugin {name!r} ({source}) would replace an existing pipeline of that name")
        register(PluginPipeline(name, func, source, param_map))
        _loaded[name] = source
        names.append(name)
        log.info("plugin pipeline %s registered from %s", name, source)
    return names
