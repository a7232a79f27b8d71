"""The registry of named pipelines: the built-in ones (``cartesian``, ``sense``, ``radial``, ``alignsense``)
and those registered later (plugins, test pipelines).

Workers look a pipeline up by the config name the scanner sent; an unknown name is an error naming the
known ones, never a silent fallback to a default recon.
"""

from __future__ import annotations

from typing import TypeVar

from reconq.recon.errors import ReconError, UnknownPipelineError
from reconq.recon.pipeline import Pipeline
from reconq.recon.pipelines import BUILTIN_PIPELINES

P = TypeVar("P", bound=Pipeline)
_REGISTRY: dict[str, Pipeline] = {p.name: p for p in BUILTIN_PIPELINES}


def register(pipeline: P) -> P:
    """Register a :class:`Pipeline` instance under its ``name`` (replacing one of that name); returns it."""
    if not isinstance(pipeline, Pipeline):
        raise ReconError(f"{pipeline!r} is not a Pipeline (reconq.recon.pipeline.Pipeline)")
    if not pipeline.name:
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
