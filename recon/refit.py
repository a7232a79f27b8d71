"""Finished images in a retrieval scan's form: its recon matrix, its FOV and its measurement uid.

The scanner files the images a retrieval scan brings back against the protocol being run, so they
are fitted to that protocol's ``encoding[0].reconSpace`` (matrix and FOV in x and y), as the anchor
framework's ``adjust_fileToSend.m`` does. Each 2D plane is mapped on its own with one real
``(m, n)`` matrix per in-plane axis, ``out = A_y @ img @ A_x.T``; z (slices, partitions) is left alone.

Centre convention (MRD, and the centered FFTs of :mod:`reconq.recon.fft`): ``position`` is the
patient coordinate of pixel ``n // 2`` along each axis, so pixel ``j`` of an axis with ``n`` pixels
of size ``d`` lies at ``(j - n // 2) * d`` from it (:class:`reconq.recon.geometry.Grid`). Every map
below keeps that point fixed, which is why ``position`` and the directions are kept as they are:

- Same pixel size (FOV change): crop or zero-pad about the centre pixel: output pixel ``j'`` is
  input pixel ``j' - m // 2 + n // 2`` (exact copies, zeros outside the input).
- Other pixel size: resampling in k-space. The centred DFT of the input has frequencies ``k / F``,
  ``k = -(n // 2) .. n // 2``; the output's band ``|k| <= F / (2 d')`` is kept (k-space cropped
  when the pixels grow, all of it kept, i.e. zero-padded, when they shrink), and the inverse DFT is
  evaluated at the output's pixel centres ``(j' - m // 2) d'``; zeros where no input pixel centre
  lies within one input pixel (beyond the input FOV, where the FFT's periodic copy would be). An
  unpaired Nyquist sample (even ``n``) and a band edge between two samples are split evenly over
  ``+k`` and ``-k``, so the map is real: real images stay real (what taking the real part after an
  FFT resampling does). Where ``F / d'`` is an integer this is exactly centred FFT, crop or zero-pad of
  k-space to ``F / d'`` samples, inverse FFT; the closed form also serves any ratio of pixel sizes and
  any FOV at once, so the output's pixels are exactly the retrieval's, not rounded to an FFT size.

References:
    Inati SJ et al. ISMRM Raw data format. Magn Reson Med 2017;77:411-421 (image header, position).
    Bernstein MA, King KF, Zhou XJ. Handbook of MRI Pulse Sequences. Elsevier 2004, sec. 13.1
    (zero-filling interpolation in k-space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np

from reconq.recon.errors import ReconError

#: Relative tolerance under which two pixel sizes or FOVs count as equal (float32 headers).
RTOL = 1e-4
UID_MAX = 2**32 - 1  # ImageHeader.measurement_uid is a uint32
MATRIX_MAX = 2**16 - 1  # ImageHeader.matrix_size is uint16


@dataclass(frozen=True)
class Plane:
    """In-plane sampling of an image: matrix ``(nx, ny)`` and FOV ``(x, y)`` in mm."""

    nx: int
    ny: int
    fov_x: float
    fov_y: float

    @property
    def pixel(self) -> tuple[float, float]:
        """Pixel size ``(dx, dy)`` in mm."""
        return self.fov_x / self.nx, self.fov_y / self.ny

    def describe(self) -> str:
        dx, dy = self.pixel
        size = f"{dx:.2f} mm" if math.isclose(dx, dy, rel_tol=RTOL) else f"{dx:.2f}x{dy:.2f} mm"
        return f"{self.nx}x{self.ny} at {size} ({self.fov_x:g}x{self.fov_y:g} mm)"


def fit_images(
    images: list[ismrmrd.Image], header: xsd.ismrmrdHeader, measurement_uid: int,
) -> tuple[list[ismrmrd.Image], str]:
    """Re-stamp images for a retrieval session and fit them to its recon matrix and FOV.

    Args:
        images: finished images, ``data`` ``(channels, nz, ny, nx)`` (x = readout = columns), usually
            uint16 magnitude; any real or complex dtype is kept.
        header: the retrieval scan's MRD header (``encoding[0].reconSpace`` matrix and FOV x, y).
        measurement_uid: the retrieval session's measurement uid (its acquisitions' value).

    Returns:
        ``(fitted, description)``: new images, ``data`` ``(channels, nz, my, mx)`` of the input dtype,
        ``matrix_size`` ``(mx, my, nz)``, ``field_of_view`` the retrieval's x, y and the input's z,
        every other header field and the meta kept; real values clipped to the range the inputs
        span (negatives from ringing to 0, never above the brightest input pixel, so the BitsStored
        scaling holds). ``description`` is one line saying what was done, for an ``INF`` text.

    Raises:
        ReconError: the header lacks a usable reconSpace, the uid does not fit a uint32, or an
            image has no pixels or no positive FOV.
    """
    target = retrieval_plane(header)
    if not isinstance(measurement_uid, int | np.integer) or not 0 <= int(measurement_uid) <= UID_MAX:
        raise ReconError(f"measurement_uid {measurement_uid}: must be 0..{UID_MAX} (uint32)")
    if not images:
        return [], "no images to fit"
    lo, hi = _value_range(images)
    maps: dict[tuple[Plane, Plane], tuple[np.ndarray, np.ndarray]] = {}
    fitted, sources, actions = [], [], set()
    for image in images:
        source = image_plane(image)
        if source not in sources:
            sources.append(source)
        actions |= _actions(source, target)
        if (source, target) not in maps:
            maps[source, target] = (axis_map(source.ny, source.pixel[1], target.ny, target.pixel[1]),
                                    axis_map(source.nx, source.pixel[0], target.nx, target.pixel[0]))
        fitted.append(_fit_one(image, target, maps[source, target], lo, hi, int(measurement_uid)))
    return fitted, _description(sources, target, actions)


def retrieval_plane(header: xsd.ismrmrdHeader) -> Plane:
    """The in-plane recon matrix and FOV of a retrieval header; refuses missing or non-positive ones."""
    space = header.encoding[0].reconSpace if header.encoding else None
    if space is None or space.matrixSize is None or space.fieldOfView_mm is None:
        raise ReconError("the retrieval scan's header has no encoding[0].reconSpace matrixSize and "
                         "fieldOfView_mm: the images cannot be fitted to it")
    matrix, fov = space.matrixSize, space.fieldOfView_mm
    values = {"matrixSize.x": matrix.x, "matrixSize.y": matrix.y,
              "fieldOfView_mm.x": fov.x, "fieldOfView_mm.y": fov.y}
    bad = [f"{k}={v}" for k, v in values.items() if v is None or not math.isfinite(v) or v <= 0]
    if bad or matrix.x > MATRIX_MAX or matrix.y > MATRIX_MAX:
        raise ReconError(f"the retrieval scan's reconSpace {', '.join(bad) or 'matrix'} is unusable: "
                         f"sizes must be positive (matrix at most {MATRIX_MAX})")
    return Plane(int(matrix.x), int(matrix.y), float(fov.x), float(fov.y))


def image_plane(image: ismrmrd.Image) -> Plane:
    """The in-plane matrix (from the data) and FOV (from the header) of an image."""
    ny, nx = image.data.shape[-2:]
    fov_x, fov_y = (float(v) for v in image.field_of_view[:2])
    if nx < 1 or ny < 1 or not (fov_x > 0 and fov_y > 0 and math.isfinite(fov_x + fov_y)):
        raise ReconError(f"image {image.image_index} of series {image.image_series_index} has "
                         f"{nx}x{ny} pixels over {fov_x}x{fov_y} mm: nothing to fit")
    return Plane(int(nx), int(ny), fov_x, fov_y)


def axis_map(n: int, d: float, m: int, d_out: float) -> np.ndarray:
    """The linear map from ``n`` pixels of size ``d`` to ``m`` pixels of size ``d_out``, same centre.

    Args:
        n, d: input pixels along the axis and their size (mm).
        m, d_out: output pixels and their size (mm).

    Returns:
        ``(m, n)`` float64 ``A``: ``out = A @ x`` along the axis. Pixel ``n // 2`` of the input and
        ``m // 2`` of the output are the same point. Equal pixel sizes give a 0/1 crop or zero-pad;
        others the k-space resampling of the module docstring.
    """
    if math.isclose(d, d_out, rel_tol=RTOL):
        source = np.arange(m) - m // 2 + n // 2
        inside = (source >= 0) & (source < n)
        out = np.zeros((m, n))
        out[np.flatnonzero(inside), source[inside]] = 1.0
        return out
    fov = n * d
    k = np.arange(-(n // 2), n // 2 + 1)  # n + 1 frequencies (both Nyquist halves) when n is even
    band = min(n, fov / d_out) / 2  # the output's half band in cycles per input FOV
    weight = np.clip(band - np.abs(k) + 0.5, 0.0, 1.0)
    x_in = (np.arange(n) - n // 2) * d
    x_out = (np.arange(m) - m // 2) * d_out
    phase_in, phase_out = 2 * np.pi * np.outer(x_in, k) / fov, 2 * np.pi * np.outer(x_out, k) / fov
    out = ((np.cos(phase_out) * weight) @ np.cos(phase_in).T
           + (np.sin(phase_out) * weight) @ np.sin(phase_in).T) / n
    tol = RTOL * d  # zero-padded: no input pixel centre nearer than one input pixel
    out[(x_out <= x_in[0] - d + tol) | (x_out >= x_in[-1] + d - tol)] = 0.0
    return out


def _value_range(images: list[ismrmrd.Image]) -> tuple[float, float]:
    """``(lo, hi)`` the fitted real values are clipped to: ``[min(0, input min), input max]``."""
    real = [image.data for image in images if not np.iscomplexobj(image.data) and image.data.size]
    if not real:
        return 0.0, 0.0
    return min(0.0, min(float(d.min()) for d in real)), max(float(d.max()) for d in real)


def _fit_one(image: ismrmrd.Image, target: Plane, maps: tuple[np.ndarray, np.ndarray],
             lo: float, hi: float, measurement_uid: int) -> ismrmrd.Image:
    data = image.data
    if _actions(image_plane(image), target):
        map_y, map_x = maps
        work = data.astype(np.complex128 if np.iscomplexobj(data) else np.float64)
        data = _cast(map_y @ work @ map_x.T, data.dtype, lo, hi)
    out = ismrmrd.Image(head=image.getHead(), attribute_string=image.attribute_string,
                        data=np.ascontiguousarray(data))
    out.field_of_view = (target.fov_x, target.fov_y, float(image.field_of_view[2]))
    out.measurement_uid = measurement_uid
    return out


def _cast(values: np.ndarray, dtype: np.dtype, lo: float, hi: float) -> np.ndarray:
    if np.iscomplexobj(values):
        return values.astype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = max(lo, info.min), min(hi, info.max)
        values = np.rint(values)
    return np.clip(values, lo, hi).astype(dtype)


def _actions(source: Plane, target: Plane) -> set[str]:
    """What fitting ``source`` to ``target`` does: resampled, cropped, zero-padded (none: unchanged)."""
    actions = set()
    for d, d_out, fov, fov_out in ((source.pixel[0], target.pixel[0], source.fov_x, target.fov_x),
                                   (source.pixel[1], target.pixel[1], source.fov_y, target.fov_y)):
        if not math.isclose(d, d_out, rel_tol=RTOL):
            actions.add("resampled in k-space")
        if not math.isclose(fov, fov_out, rel_tol=RTOL):
            actions.add("cropped" if fov_out < fov else "zero-padded")
    return actions


def _description(sources: list[Plane], target: Plane, actions: set[str]) -> str:
    if not actions:
        return "unchanged: the retrieval scan's matrix and FOV match"
    done = [a for a in ("resampled in k-space", "cropped", "zero-padded") if a in actions]
    steps = done[0] if len(done) == 1 else f"{', '.join(done[:-1])} and {done[-1]}"
    return (f"images {', '.join(s.describe() for s in sources)} fitted to the retrieval scan's "
            f"{target.describe()}: {steps}")
