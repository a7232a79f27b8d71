"""The built-in pipelines, ``cartesian``, ``sense``, ``radial`` and ``alignsense`` (:data:`BUILTIN_PIPELINES`),
on the contract of :mod:`reconq.recon.pipeline`; :mod:`reconq.recon.registry` registers them.

These classes declare the contract; the reconstructions they run live in :mod:`reconq.recon.runs`,
imported when a job runs. So the processes that only queue jobs and estimate them (the gateway, the API,
the command line) start without the recon's numerical stack (sigpy, numba, scipy.signal: over a second).
The Cartesian ones' GPU memory follows the scheduler's header-based model, and every run time the history
of earlier runs; ``radial`` (its NUFFT plans' oversampled grids) and ``alignsense`` (its per-shot arrays)
declare their own memory models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ismrmrd

from reconq.recon.estimates import alignsense_memory_bytes, alignsense_seconds
from reconq.recon.pipeline import CUDA_CONTEXT_BYTES, Param, Pipeline, ProgressFn
from reconq.recon.rawdata import RawScan

# The main numeric parameters of the built-ins and the ranges a job may set them in (checked before a job
# is queued, :func:`reconq.recon.pipeline.parameter_refusal`): wide enough for any sensible recon, narrow
# enough that a parameter cannot make a job run for days or allocate without bound.
_COMMON = {"chunk": Param(int, 1, 1 << 20), "series_index": Param(int, 0, 65534)}
_SENSE = {**_COMMON, "lamda": Param(float, 0, 1e3), "niter": Param(int, 0, 1000), "batch": Param(int, 1, 4096),
          "lowres": Param(int, 4, 512)}
_RADIAL = {**_COMMON, "niter": Param(int, 0, 1000), "lamda": Param(float, 0, 1e3), "eps": Param(float, 1e-12, 0.5),
           "lowres": Param(float, 0.5, 1024), "threads": Param(int, 1, 1024)}
_ALIGNSENSE = {**_SENSE, "shots": Param(int, 1, 1 << 16), "max_iterations": Param(int, 1, 10_000),
               "cg_iterations": Param(int, 1, 1000), "translation_tol": Param(float, 0, 100),
               "rotation_tol": Param(float, 0, 100)}


class CartesianPipeline(Pipeline):
    """Cartesian FFT and coil combination, noise pre-whitened, partial Fourier by POCS, uint16 images.

    Params (all optional): ``combine`` (``"sos"``, the default, or ``"walsh"``), ``keep_averages``
    (false: averages are averaged), ``prewhiten`` (true: use the scan's noise readouts), ``device``
    (sigpy device id, -1 CPU, the default), ``chunk`` (readouts read at a time, 2048),
    ``series_index`` (1), ``description`` (the pipeline name).
    """

    name = "cartesian"
    parameters = _COMMON

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
    parameters = _SENSE

    def run(self, scan: RawScan, params: Mapping[str, Any], progress: ProgressFn) -> list[ismrmrd.Image]:
        from reconq.recon.runs import run_sense  # the numerical stack, loaded when a job runs

        return run_sense(scan, params, progress, self.name)


class RadialPipeline(Pipeline):
    """2D radial, 3D radial ("kooshball") and stack-of-stars scans, single- or multi-echo, on a NUFFT.

    Trajectories come from the readouts (``acq.traj``, units as :mod:`reconq.recon.radialdata` says) or,
    for a Pulseq scan whose header names its sequence's signature (``seq_signature``), from that
    ``.seq`` file in the worker's sequence folder (:mod:`reconq.recon.pulseq`). Each echo
    (``idx.contrast``) is one volume; echoes on one trajectory share one NUFFT plan.

    Params (all optional): ``dcf`` (``"analytic"``, the default: radial density; ``"pipe"``: Pipe–Menon),
    ``niter`` (0: gridding; > 0: that many DCF-weighted CG iterations), ``combine`` (``"sos"``, the
    default, or ``"maps"``: coil maps from the centre of k-space), ``lamda`` (Tikhonov weight of CG),
    ``eps`` (NUFFT tolerance), ``lowres`` (radius of the map centre, cycles per FOV), ``toeplitz`` (true:
    CG's normal operator by Toeplitz embedding; false: a NUFFT pair per iteration), ``threads``
    (host threads, default every core of the worker), ``prewhiten``, ``device``, ``chunk``,
    ``series_index``, ``description`` as for ``cartesian``.
    """

    name = "radial"
    parameters = _RADIAL

    def run(self, scan: RawScan, params: Mapping[str, Any], progress: ProgressFn) -> list[ismrmrd.Image]:
        from reconq.recon.runs import run_radial  # the numerical stack, loaded when a job runs

        return run_radial(scan, params, progress, self.name)

    def memory_estimate(self, header: ismrmrd.xsd.ismrmrdHeader, params: Mapping[str, Any]) -> int | None:
        """The NUFFT's GPU memory: two plans' oversampled grids (×2 per axis) for every coil and echo, the
        samples three times over (data, forward result, residual), four CG images per transform, the
        Toeplitz kernel with its padded batch, and the coordinates."""
        try:
            enc = header.encoding[0]
            nx, ny, nz = (int(v or 1) for v in (enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y,
                                                  enc.reconSpace.matrixSize.z))
            ns = int(enc.encodedSpace.matrixSize.x)
            limits = enc.encodingLimits
            spokes = _count(limits, "kspace_encoding_step_1") * _count(limits, "kspace_encoding_step_2")
            readouts = spokes * _count(limits, "slice") * _count(limits, "average")
            echoes = _count(limits, "contrast")
        except (AttributeError, IndexError, TypeError, ValueError):
            return None  # the scheduler's header model, which says what is missing
        system = header.acquisitionSystemInformation
        ncoil = max(1, int(getattr(system, "receiverChannels", None) or 1))
        ndim = 3 if max(nz, int(enc.encodedSpace.matrixSize.z or 1)) > 1 else 2
        n_trans = ncoil * echoes
        grid = nx * ny * max(nz, 1) * n_trans * 8
        samples = readouts * ns * n_trans * 8
        toeplitz = 5 * 2**ndim * nx * ny * max(nz, 1) * 8  # the kernel and a batch of 4 padded images
        return (CUDA_CONTEXT_BYTES + 2 * 2**ndim * grid + 3 * samples + 4 * grid + toeplitz
                + readouts * ns * ndim * 4 * 2)


class AlignSensePipeline(Pipeline):
    """Motion-corrected SENSE: rigid motion per shot estimated and corrected inside the SENSE recon.

    For 2D multi-slice and 3D Cartesian scans, accelerated or not. Shots are the job parameter ``shots``
    (consecutive blocks of readouts), else the readouts' ``idx.segment``, else consecutive blocks of
    ``encoding.echoTrainLength`` readouts (:func:`reconq.recon.runs.shot_masks`); a sampling order that
    cannot be corrected (each shot one contiguous block of k-space), or voxels that are not isotropic, get
    a warning on the job and plain SENSE images. Coil
    maps come from the calibration lines or a reference scan (``reference_protocol`` /
    ``reference_scan``, as ``sense``).

    Params (all optional): ``shots``, ``compare`` (true: the uncorrected SENSE images as a second series),
    ``max_iterations``, ``cg_iterations``, ``levels``, ``translation_tol``, ``rotation_tol`` (the solver's,
    :class:`reconq.recon.alignsense.AlignOptions`), and
    ``maps``, ``lamda``, ``lowres``, ``prewhiten``, ``device``, ``chunk``, ``series_index``,
    ``description`` as for ``sense``. The motion per shot is kept on the job (``report["motion"]``) and
    in every image's meta (``ReconQMotion``).
    """

    name = "alignsense"
    parameters = _ALIGNSENSE

    def run(self, scan: RawScan, params: Mapping[str, Any], progress: ProgressFn) -> list[ismrmrd.Image]:
        from reconq.recon.runs import run_alignsense  # the numerical stack, loaded when a job runs

        return run_alignsense(scan, params, progress, self.name)

    def memory_estimate(self, header: ismrmrd.xsd.ismrmrdHeader, params: Mapping[str, Any]) -> int | None:
        """The solver's peak (:func:`reconq.recon.estimates.alignsense_memory_bytes`) on the solve grid
        (encoded phase lines, recon readout; twice the phase FOV with ``fov: reference``)."""
        try:
            enc = header.encoding[0]
            nx = int(enc.reconSpace.matrixSize.x)
            ny, nz = int(enc.encodedSpace.matrixSize.y), max(1, int(enc.encodedSpace.matrixSize.z or 1))
        except (AttributeError, IndexError, TypeError, ValueError):
            return None
        system = header.acquisitionSystemInformation
        ncoil = max(1, int(getattr(system, "receiverChannels", None) or 1))
        ny *= 2 if params.get("fov") == "reference" else 1
        shape = (nz, ny, nx) if nz > 1 else (ny, nx)
        return CUDA_CONTEXT_BYTES + alignsense_memory_bytes(shape, ncoil, _shots(header, params))

    def runtime_estimate(self, header: ismrmrd.xsd.ismrmrdHeader, params: Mapping[str, Any]) -> float | None:
        """The solver's host-time model (:func:`reconq.recon.estimates.alignsense_seconds`; it comes before
        the run-time history): on a GPU an upper bound, which only holds back backfilling and makes the
        expected finish a cautious one."""
        try:
            enc = header.encoding[0]
            nx = int(enc.reconSpace.matrixSize.x)
            ny, nz = int(enc.encodedSpace.matrixSize.y), max(1, int(enc.encodedSpace.matrixSize.z or 1))
            ncoil = max(1, int(getattr(header.acquisitionSystemInformation, "receiverChannels", None) or 1))
        except (AttributeError, IndexError, TypeError, ValueError):
            return None
        return alignsense_seconds((nz, ny, nx) if nz > 1 else (ny, nx), ncoil, _shots(header, params))


def _shots(header: ismrmrd.xsd.ismrmrdHeader, params: Mapping[str, Any]) -> int:
    """The number of shots the header or the parameters imply (16 where neither says)."""
    try:
        if params.get("shots") is not None:
            return max(1, int(params["shots"]))
        enc = header.encoding[0]
        segments = _count(enc.encodingLimits, "segment")
        if segments > 1:
            return segments
        lines = _count(enc.encodingLimits, "kspace_encoding_step_1") * _count(enc.encodingLimits,
                                                                              "kspace_encoding_step_2")
        if enc.echoTrainLength:
            return max(1, lines // int(enc.echoTrainLength))
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    return 16


def _count(limits: ismrmrd.xsd.encodingLimitsType | None, name: str) -> int:
    limit = getattr(limits, name, None) if limits is not None else None
    return int(limit.maximum) + 1 if limit is not None and limit.maximum is not None else 1


#: The pipelines every ReconQ process knows, registered by :mod:`reconq.recon.registry`.
BUILTIN_PIPELINES: tuple[Pipeline, ...] = (CartesianPipeline(), SensePipeline(), RadialPipeline(),
                                           AlignSensePipeline())
