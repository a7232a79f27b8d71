"""The pipeline contract: every hook the scheduler and the workers call on a reconstruction.

A pipeline turns one stored raw scan into scanner-ready images. Subclass :class:`Pipeline`, give it a
``name`` and a :meth:`~Pipeline.run`, and override the estimates where the defaults do not describe
it; register an instance (:func:`reconq.recon.registry.register`), or write a plugin
(:mod:`reconq.recon.plugins`), which declares the same hooks as module-level names.

Who calls what:

- the submitter (gateway, API) and the first worker to take a job call :meth:`~Pipeline.memory_estimate`
  and :meth:`~Pipeline.runtime_estimate` with the scan's parsed header and the job's parameters
  (:mod:`reconq.scheduler.estimate`: a ``gpu_memory_gb`` or ``expected_seconds`` job parameter comes
  first; ``None`` from a hook falls back to the header-based memory model and the run-time history);
- a CPU worker runs a job only where :attr:`~Pipeline.cpu_capable` is true;
- the gateway (before it queues a scan's job) and the estimates check the numeric parameters a pipeline
  declares in :attr:`~Pipeline.parameters` (:class:`Param`, :func:`parameter_refusal`);
- the worker calls :meth:`~Pipeline.run` on its GPU (``params["device"]``) or on the CPU.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import ismrmrd
import ismrmrd.xsd

from reconq.recon.rawdata import RawScan

logger = logging.getLogger(__name__)

#: GPU memory a recon needs before its data: the CUDA context, FFT/NUFFT plans and library handles.
CUDA_CONTEXT_BYTES = 512 * 2**20

#: ``progress(fraction, stage)``: fraction of the recon done, 0..1, and a short stage text ("reading").
#: The worker's progress object also takes :func:`warn` and :func:`report` (a plain function does not
#: need to: those then only log).
ProgressFn = Callable[[float, str], None]


def warn(progress: ProgressFn, text: str) -> None:
    """Warn the technologist: ``text`` is kept on the job (its page shows it) and sent to the retrieval
    scan as a ``WRN`` with the images. No patient data in ``text``."""
    logger.warning("recon warning: %s", text)
    note = getattr(progress, "warn", None)
    if callable(note):
        note(text)


def report(progress: ProgressFn, name: str, value: Any) -> None:
    """Keep a result beside the images on the job (``value`` JSON: numbers, strings, lists, dicts), e.g.
    the motion per shot; the job page and ``GET /api/jobs/{id}`` show it under ``report[name]``."""
    keep = getattr(progress, "report", None)
    if callable(keep):
        keep(name, value)
    else:
        logger.info("recon report %s: %s", name, value)


@dataclass(frozen=True)
class Param:
    """A numeric job parameter a pipeline declares: whole (``int``) or real (``float``), and the range it
    accepts, both ends included. A JSON number or a string holding one is taken (as the recon's own casts
    take both); another type, a value that is not finite, not whole where it must be, or out of range is
    refused, with the name, the value and the range."""

    kind: type[int] | type[float]
    low: float
    high: float

    def refusal(self, name: str, value: Any) -> str | None:
        """Why ``value`` is refused for the parameter ``name``; None where it is accepted."""
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        whole = self.kind is int
        wanted = f"{'a whole number' if whole else 'a number'} in {self.low:g}..{self.high:g}"
        try:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError
            number = float(int(value.strip()) if whole and isinstance(value, str) else value)
        except (ValueError, OverflowError):
            return f"parameter {name}={shown} is not {wanted}"
        if not math.isfinite(number) or (whole and not number.is_integer()):
            return f"parameter {name}={shown} is not {wanted}"
        if not self.low <= number <= self.high:
            return f"parameter {name}={shown} is out of range: {wanted}"
        return None


def parameter_refusal(pipeline: Pipeline, params: Mapping[str, Any]) -> str | None:
    """Why ``params`` are refused for ``pipeline`` (the first declared parameter out of its range), or None.
    Parameters it does not declare pass as they come (plugins read what they like)."""
    for name, param in (getattr(pipeline, "parameters", None) or {}).items():
        if params.get(name) is not None:
            why = param.refusal(name, params[name])
            if why:
                return f"pipeline {pipeline.name}: {why}"
    return None


class Pipeline(ABC):
    """A named reconstruction with its resource estimates.

    Attributes:
        name: the config name scanners and retro-recon requests use (unique among registered pipelines).
        cpu_capable: whether a worker without a GPU may run it (default True; False for a pipeline
            that needs cupy or a GPU-only library).
        parameters: its numeric parameters and their ranges (name -> :class:`Param`), checked before a
            job is queued (:func:`parameter_refusal`); none by default.
    """

    name: str = ""
    cpu_capable: bool = True
    parameters: Mapping[str, Param] = MappingProxyType({})

    @abstractmethod
    def run(self, scan: RawScan, params: Mapping[str, Any], progress: ProgressFn) -> list[ismrmrd.Image]:
        """Reconstruct ``scan``.

        Args:
            scan: the raw scan, open (header, readout headers, chunks of readouts with trajectories).
            params: the job's parameters (JSON values); ``device`` is the sigpy device id (-1: CPU) the
                worker chose. Unknown keys are ignored.
            progress: called now and then; it raises when the job is cancelled, which stops the recon.

        Returns:
            MRD images in the scanner's conventions (:func:`reconq.recon.images.to_mrd_images`).

        Raises:
            ReconError: the scan or its parameters cannot be reconstructed; the message is shown to the
                technologist.
        """

    def memory_estimate(self, header: ismrmrd.xsd.ismrmrdHeader, params: Mapping[str, Any]) -> int | None:
        """GPU memory, in bytes, the recon of a scan with ``header`` needs at its peak (CUDA context
        included); ``None`` (the default): the generic header-based model of
        :func:`reconq.scheduler.estimate.default_estimate` (one multi-coil volume at a time).

        Called where the job is placed, with the parsed header only: it must not read the raw file."""
        return None

    def runtime_estimate(self, header: ismrmrd.xsd.ismrmrdHeader, params: Mapping[str, Any]) -> float | None:
        """Expected run time on a GPU, in seconds; ``None`` (the default): the median of this pipeline's
        latest run times on the same protocol, else unknown. Only orders waiting jobs and lets short jobs
        backfill memory held for a large one, so a rough figure is enough."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
