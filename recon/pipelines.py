"""The registry of named reconstruction pipelines.

A pipeline turns a raw scan into scanner-ready images. Workers look one up by the config name
the scanner sent; an unknown name is an error, never a silent fallback.

References:
    Ning et al. Asynchronous inline reconstruction. Magn Reson Med 2026, doi 10.1002/mrm.70304.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import ismrmrd
import numpy as np
import sigpy as sp

from recon.cartesian import CartesianEncoding, KspaceBuffer, image_geometries, reconstruct
from recon.errors import ReconError, UnknownPipelineError
from recon.images import to_mrd_images
from recon.rawdata import RawScan

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]


class Pipeline(Protocol):
    """A named reconstruction: ``run`` reports progress (fraction 0..1, stage) as it goes."""

    name: str

    def run(self, scan: RawScan, params: Mapping[str, Any], progress: ProgressFn) -> list[ismrmrd.Image]: ...


P = TypeVar("P", bound=Pipeline)
_REGISTRY: dict[str, Pipeline] = {}


def register(pipeline: P) -> P:
    """Register a pipeline instance under its ``name``; returns it (usable as a decorator on an instance)."""
    if not getattr(pipeline, "name", None):
        raise ReconError(f"pipeline {pipeline!r} has no name")
    _REGISTRY[pipeline.name] = pipeline
    return pipeline


def get_pipeline(name: str) -> Pipeline:
    """The pipeline registered as ``name``; raises UnknownPipelineError naming the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownPipelineError(
            f"unknown pipeline {name!r}; known pipelines: {', '.join(pipeline_names())}") from None


def pipeline_names() -> list[str]:
    """The registered pipeline names, sorted."""
    return sorted(_REGISTRY)


class CartesianPipeline:
    """Cartesian FFT, sum of squares, oversampling removed, uint16 images.

    Params (all optional): ``device`` (sigpy device id, -1 CPU, the default), ``chunk``
    (readouts per HDF5 read, 2048), ``series_index`` (1), ``description`` (the pipeline name).
    """

    name = "cartesian"

    def run(self, scan: RawScan, params: Mapping[str, Any], progress: ProgressFn) -> list[ismrmrd.Image]:
        enc = CartesianEncoding.from_header(scan.header)
        buffer = self._read(scan, enc, int(params.get("chunk", 2048)), progress)
        if not buffer.volume_keys():
            raise ReconError(f"{scan.path}: no imaging readouts ({buffer.skipped} skipped)")
        progress(0.6, "fft")
        mags, geometry = [], []
        device = _device(params.get("device", -1))
        with device:
            for key in buffer.volume_keys():
                img = reconstruct(sp.to_device(buffer.kspace(key), device), enc)
                mags.append(sp.to_device(img, sp.cpu_device))
                geometry += image_geometries(buffer, key)
        progress(0.9, "images")
        images = to_mrd_images(np.concatenate(mags), geometry, scan.header,
                               series_index=int(params.get("series_index", 1)),
                               description=str(params.get("description", self.name)),
                               history=("RECONQ", self.name))
        progress(1.0, "images")
        logger.info("%s: %d images from %d volumes", scan.path.name, len(images), len(mags))
        return images

    @staticmethod
    def _read(scan: RawScan, enc: CartesianEncoding, chunk: int, progress: ProgressFn) -> KspaceBuffer:
        buffer = KspaceBuffer(enc)
        progress(0.0, "reading")
        for start, heads, data in scan.iter_chunks(chunk):
            buffer.add(heads, data)
            progress(0.6 * (start + len(heads)) / len(scan), "reading")
        return buffer


def _device(value: Any) -> sp.Device:
    try:
        return sp.Device(int(value))
    except (TypeError, ValueError) as e:
        raise ReconError(f"device {value!r} is not usable: {e}") from e


register(CartesianPipeline())
