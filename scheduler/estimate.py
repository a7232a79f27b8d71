"""GPU memory estimates per job, from the MRD header and the job's parameters.

Order of precedence:

1. ``params["gpu_memory_gb"]``: the sender (or an admin's retro-recon) states the need (a number in
   (0, :data:`MAX_GPU_MEMORY_GB`]; ``expected_seconds`` in (0, :data:`MAX_EXPECTED_SECONDS`]: sent by any MRD
   client, they are checked, :func:`check_params`, with the ranges the pipeline declares for its own);
2. the pipeline's own model, ``pipeline.memory_estimate(header, params)`` (bytes; the hook of
   :class:`reconq.recon.pipeline.Pipeline`), for pipelines whose needs the default model does not
   describe; ``None``, the contract's default, passes on to
3. :func:`default_estimate`.

The default model, for a pipeline that reconstructs one volume at a time on the GPU::

    bytes = CONTEXT_BYTES + WORK_FACTOR * grid * ncoil * nx * ny * nz * 8

``nx, ny, nz``: the first encoding's encoded matrix; ``ncoil``: the receiver channels; 8 bytes per
complex64 sample; ``grid``: 1 for Cartesian, ``GRID_OVERSAMPLING ** ndim`` for non-Cartesian
trajectories (gridding on an oversampled grid); ``WORK_FACTOR`` covers k-space, coil images, FFT
workspace and the combined image; ``CONTEXT_BYTES`` the CUDA context and library handles.

Run-time estimates (:func:`estimate_seconds`), which only order waiting jobs and let short jobs backfill
memory held for a large one, come from ``params["expected_seconds"]``, the pipeline's
``runtime_estimate(header, params)`` (seconds; ``None``: not known), or the median of the latest run
times of the same pipeline and protocol (:func:`record_runtime` keeps them), in that order; else they
are unknown. Run times are kept per device class (:data:`GPU`, :data:`CPU`): a CPU run is slower, so
GPU placement reads the GPU history and an exam's expected finish the history of where its job runs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

import redis

from reconq.core.constants import RUNTIME_HISTORY
from reconq.recon.pipeline import CUDA_CONTEXT_BYTES, Pipeline, parameter_refusal

GB = 10**9
#: CUDA context, cuFFT plans and library handles (the pipeline contract's figure).
CONTEXT_BYTES = CUDA_CONTEXT_BYTES
#: Copies of one volume's multi-coil data alive at the peak of a recon.
WORK_FACTOR = 4
#: Oversampling of the gridding grid for non-Cartesian trajectories, per dimension.
GRID_OVERSAMPLING = 1.25
#: Bytes of one complex64 sample.
SAMPLE_BYTES = 8

#: The largest ``gpu_memory_gb`` a job may state (a whole node's worth of GPUs, and more).
MAX_GPU_MEMORY_GB = 1024.0
#: The largest ``expected_seconds`` a job may state: 7 days.
MAX_EXPECTED_SECONDS = 7 * 24 * 3600.0


class EstimateError(ValueError):
    """A header or parameter from which no estimate can be made."""


def _hint(params: Mapping[str, Any], name: str, high: float) -> float:
    """The scheduling hint ``params[name]``, a number in (0, ``high``]; EstimateError saying why not."""
    value = params[name]
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise EstimateError(f"{name} {str(value)[:40]!r} is not a number") from e
    if not 0 < number <= high:  # NaN too
        raise EstimateError(f"{name} must be positive and at most {high:g}, not {number:g}")
    return number


def check_params(params: Mapping[str, Any], pipeline: Pipeline | None = None) -> None:
    """EstimateError naming the first parameter refused: a scheduling hint (``gpu_memory_gb``,
    ``expected_seconds``) that is not a number in its range, or a parameter ``pipeline`` declares out of
    its range (:func:`reconq.recon.pipeline.parameter_refusal`)."""
    for name, high in (("gpu_memory_gb", MAX_GPU_MEMORY_GB), ("expected_seconds", MAX_EXPECTED_SECONDS)):
        if name in params:
            _hint(params, name, high)
    why = parameter_refusal(pipeline, params) if pipeline is not None else None
    if why:
        raise EstimateError(why)


def default_estimate(header: Any, params: Mapping[str, Any]) -> int:
    """Bytes of GPU memory for ``header`` (an ``ismrmrd.xsd.ismrmrdHeader``) under the default model."""
    try:
        enc = header.encoding[0]
        matrix = enc.encodedSpace.matrixSize
        nx, ny, nz = int(matrix.x), int(matrix.y), max(1, int(matrix.z or 1))
    except (AttributeError, IndexError, TypeError) as e:
        raise EstimateError(f"header has no encoded matrix: {e}") from e
    system = getattr(header, "acquisitionSystemInformation", None)
    ncoil = max(1, int(getattr(system, "receiverChannels", None) or 1))
    trajectory = str(getattr(getattr(enc, "trajectory", None), "value", getattr(enc, "trajectory", "cartesian")))
    ndim = 3 if nz > 1 else 2
    grid = 1.0 if trajectory.lower() in ("cartesian", "epi") else GRID_OVERSAMPLING**ndim
    volume = nx * ny * nz * ncoil * SAMPLE_BYTES
    return CONTEXT_BYTES + int(math.ceil(WORK_FACTOR * grid * volume))


def estimate_bytes(header: Any, params: Mapping[str, Any], pipeline: Pipeline | None = None) -> int:
    """The job's GPU memory need in bytes (see the module docstring for the order of precedence);
    ``pipeline`` None: the parameters, else the default model. The parameters are checked first
    (:func:`check_params`), so a job refused at the gateway is refused here too, whoever made it."""
    check_params(params, pipeline)
    if "gpu_memory_gb" in params:
        return int(_hint(params, "gpu_memory_gb", MAX_GPU_MEMORY_GB) * GB)
    own = pipeline.memory_estimate(header, params) if pipeline is not None else None
    if pipeline is None or own is None:
        return default_estimate(header, params)
    if int(own) <= 0:
        raise EstimateError(f"pipeline {pipeline.name!r} estimated {own} bytes")
    return int(own)


#: Run times kept per pipeline, protocol and device class for :func:`history_seconds`.
HISTORY_KEPT = 20
#: Device classes whose run times are kept apart.
GPU, CPU = "gpu", "cpu"
DEVICE_CLASSES = (GPU, CPU)


def estimate_seconds(header: Any, params: Mapping[str, Any], pipeline: Pipeline | None = None,
                     history: float | None = None) -> float:
    """The job's expected run time in seconds; 0 where nothing says (the scheduler then treats it as
    typical). Order of precedence: ``params["expected_seconds"]``; the pipeline's
    ``runtime_estimate(header, params)``, unless it returns ``None``; ``history`` (the median of this
    pipeline's and protocol's latest run times, :func:`history_seconds`). The scheduler uses it only to
    order waiting jobs (long, large jobs first), so a rough figure is enough."""
    if "expected_seconds" in params:
        return _hint(params, "expected_seconds", MAX_EXPECTED_SECONDS)
    own = pipeline.runtime_estimate(header, params) if pipeline is not None else None
    if own is not None:
        return max(0.0, float(own))
    return history or 0.0


def _history_key(pipeline: str, protocol: str, device: str) -> str:
    if device not in DEVICE_CLASSES:
        raise ValueError(f"device class must be one of {DEVICE_CLASSES}, not {device!r}")
    return f"{RUNTIME_HISTORY}{device}:{pipeline}:{protocol}"


def record_runtime(client: redis.Redis, pipeline: str, protocol: str, seconds: float, device: str = GPU) -> None:
    """Keep a finished job's run time (the latest :data:`HISTORY_KEPT` per pipeline, protocol and device
    class, ``gpu`` or ``cpu``)."""
    key = _history_key(pipeline, protocol, device)
    pipe = client.pipeline()
    pipe.lpush(key, f"{seconds:.3f}")
    pipe.ltrim(key, 0, HISTORY_KEPT - 1)
    pipe.execute()


def history_seconds(client: redis.Redis, pipeline: str, protocol: str, device: str = GPU) -> float | None:
    """The median of the latest run times of ``pipeline`` on ``protocol`` on ``device`` (``gpu`` or
    ``cpu``); None if it has none."""
    times = [float(x) for x in client.lrange(_history_key(pipeline, protocol, device), 0, -1)]
    return statistics.median(times) if times else None
