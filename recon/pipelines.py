"""The built-in pipelines, ``cartesian`` and ``sense`` (:data:`BUILTIN_PIPELINES`), on the contract of
:mod:`reconq.recon.pipeline`; :mod:`reconq.recon.registry` registers them.

These classes declare the contract; the reconstructions they run live in :mod:`reconq.recon.runs`,
imported when a job runs. So the processes that only queue jobs and estimate them (the gateway, the API,
the command line) start without the recon's numerical stack (sigpy, numba, scipy.signal: over a second).
Their GPU memory follows the scheduler's header-based model, and their run time the history of earlier
runs, so they keep the contract's default estimates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ismrmrd

from reconq.recon.pipeline import Pipeline, ProgressFn
from reconq.recon.rawdata import RawScan


class CartesianPipeline(Pipeline):
    """Cartesian FFT and coil combination, noise pre-whitened, partial Fourier by POCS, uint16 images.

    Params (all optional): ``combine`` (``"sos"``, the default, or ``"walsh"``), ``keep_averages``
    (false: averages are averaged), ``prewhiten`` (true: use the scan's noise readouts), ``device``
    (sigpy device id, -1 CPU, the default), ``chunk`` (readouts read at a time, 2048),
    ``series_index`` (1), ``description`` (the pipeline name).
    """

    name = "cartesian"

    def run(self, scan: RawScan, params: Mapping[str, Any], progress: ProgressFn) -> list[ismrmrd.Image]:
        from reconq.recon.runs import run_cartesian  # the numerical stack, loaded when a job runs

        return run_cartesian(scan, params, progress, self.name)


class SensePipeline(Pipeline):
    """SENSE with coil maps from the scan's calibration lines or from a reference scan.

    Params (all optional): ``reference`` (path of a fully sampled reference scan's raw MRD file:
    its maps, resampled into this scan's geometry, replace the calibration maps), ``maps``
    (``"espirit"``, the default, or ``"walsh"``), ``method`` (``"auto"``: direct unfolding for
    regular sampling, else CG; ``"unfold"``; ``"cg"``), ``lamda`` (1e-4, Tikhonov weight), ``niter``
    (CG iterations, 20), ``batch`` (readout columns per solve, 32), ``lowres`` (coarse map grid, 48),
    ``prewhiten``, ``keep_averages``, ``device``, ``chunk``, ``series_index``, ``description`` as for
    ``cartesian``.
    """

    name = "sense"

    def run(self, scan: RawScan, params: Mapping[str, Any], progress: ProgressFn) -> list[ismrmrd.Image]:
        from reconq.recon.runs import run_sense  # the numerical stack, loaded when a job runs

        return run_sense(scan, params, progress, self.name)


#: The pipelines every ReconQ process knows, registered by :mod:`reconq.recon.registry`.
BUILTIN_PIPELINES: tuple[Pipeline, ...] = (CartesianPipeline(), SensePipeline())
