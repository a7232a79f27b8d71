"""How the built-in pipelines reconstruct: the scan read into a k-space buffer, each volume reconstructed on
the device ``params["device"]`` names, and scanner images made.

:mod:`reconq.recon.pipelines` declares the pipelines; this module is imported when one of them runs.

References:
    Ning et al. Asynchronous inline reconstruction. Magn Reson Med 2026, doi 10.1002/mrm.70304.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ismrmrd
import numpy as np
import sigpy as sp

from reconq.recon import fft
from reconq.recon.cartesian import reconstruct
from reconq.recon.errors import ReconError
from reconq.recon.images import to_mrd_images
from reconq.recon.kspace import (
    CartesianEncoding,
    KspaceBuffer,
    image_geometries,
    imaging_mask,
    noise_mask,
    partial_fourier_extents,
    volume_key,
)
from reconq.recon.noise import prewhiten
from reconq.recon.pipeline import ProgressFn, report, warn
from reconq.recon.rawdata import RawScan
from reconq.recon.senserecon import SenseOptions, reference_maps, sense_volume, to_recon_space, whitener

logger = logging.getLogger(__name__)


def run_cartesian(scan: RawScan, params: Mapping[str, Any], progress: ProgressFn,
                  name: str = "cartesian") -> list[ismrmrd.Image]:
    """The ``cartesian`` pipeline's recon (params: :class:`~reconq.recon.pipelines.CartesianPipeline`). A scan
    whose header declares parallel-imaging acceleration is reconstructed as it is (its images fold), with a
    warning on the job and in every image's ``ImageComments`` suggesting ``sense``."""
    enc = CartesianEncoding.from_header(scan.header)
    folded = undersampled_warning(scan.header, name)
    if folded:
        warn(progress, folded)
    buffer = read_scan(scan, enc, params, progress, 0.6)
    w = whitener(buffer) if _flag(params, "prewhiten", True) else None
    progress(0.6, "fft")
    mags, geometry = [], []
    device = _device(params.get("device", -1))
    with device:
        for key in buffer.volume_keys():
            ksp = sp.to_device(buffer.kspace(key), device)
            if w is not None:
                ksp = prewhiten(ksp, w)
            img = reconstruct(ksp, enc, partial_fourier_extents(buffer, key),
                              combine=str(params.get("combine", "sos")))
            mags.append(sp.to_device(img, sp.cpu_device))
            geometry += image_geometries(buffer, key)
    images = _images(name, scan, params, mags, geometry, progress)
    if folded:
        add_comment(images, folded)
    return images


def declared_acceleration(header: Any) -> tuple[int, int]:
    """``(Ry, Rz)`` the header's ``encoding/parallelImaging/accelerationFactor`` declares (1 where unset)."""
    pi = header.encoding[0].parallelImaging if header.encoding else None
    factor = pi.accelerationFactor if pi is not None else None
    if factor is None:
        return 1, 1
    return int(factor.kspace_encoding_step_1 or 1), int(factor.kspace_encoding_step_2 or 1)


def undersampled_warning(header: Any, name: str = "cartesian") -> str | None:
    """The warning for an FFT recon of a scan whose header declares acceleration (None: it declares none)."""
    ry, rz = declared_acceleration(header)
    if max(ry, rz) <= 1:
        return None
    return (f"{name}: the scan is undersampled (parallel imaging, acceleration {ry} x {rz} in its header): "
            "these images fold; reconstruct it with the sense pipeline")


def add_comment(images: list[ismrmrd.Image], text: str) -> None:
    """Add ``text`` to every image's ``ImageComments`` meta (DICOM ImageComments at the scanner)."""
    for image in images:
        meta = ismrmrd.Meta.deserialize(image.attribute_string) if image.attribute_string else ismrmrd.Meta()
        comments = meta.get("ImageComments", [])
        meta["ImageComments"] = [*(comments if isinstance(comments, list) else [comments]), text]
        image.attribute_string = meta.serialize()


def run_sense(scan: RawScan, params: Mapping[str, Any], progress: ProgressFn,
              name: str = "sense") -> list[ismrmrd.Image]:
    """The ``sense`` pipeline's recon (params: :class:`~reconq.recon.pipelines.SensePipeline`)."""
    enc = CartesianEncoding.from_header(scan.header)
    opts = _sense_options(params)
    buffer = read_scan(scan, enc, params, progress, 0.5)
    w = whitener(buffer) if opts.prewhiten else None
    reference = _reference(params, opts, progress) if params.get("reference") else None
    mags, geometry = [], []
    device = _device(params.get("device", -1))
    keys = buffer.volume_keys()
    for i, key in enumerate(keys):
        progress(0.6 + 0.3 * i / len(keys), "sense")
        img = sense_volume(buffer, key, scan.header, opts, device, reference, w)
        mags.append(np.abs(sp.to_device(img, sp.cpu_device)).astype(np.float32))
        geometry += image_geometries(buffer, key)
    return _images(name, scan, params, mags, geometry, progress)


def _sense_options(params: Mapping[str, Any]) -> SenseOptions:
    try:
        return SenseOptions(maps=str(params.get("maps", "espirit")), method=str(params.get("method", "auto")),
                            lamda=float(params.get("lamda", 1e-4)), niter=int(params.get("niter", 20)),
                            batch=int(params.get("batch", 32)), lowres=int(params.get("lowres", 48)),
                            prewhiten=_flag(params, "prewhiten", True))
    except (TypeError, ValueError) as e:
        raise ReconError(f"invalid SENSE parameter: {e}") from e


def _reference(params: Mapping[str, Any], opts: SenseOptions, progress: ProgressFn):
    progress(0.5, "reference")
    with RawScan.open(params["reference"]) as ref:
        enc = CartesianEncoding.from_header(ref.header)
        buffer = read_scan(ref, enc, {"chunk": params.get("chunk", 2048)}, lambda f, s: None, 0.0)
        if not buffer.volume_keys():
            raise ReconError(f"reference {ref.path}: no imaging readouts")
        w = whitener(buffer) if opts.prewhiten else None
        return reference_maps(buffer, ref.header, opts, w)


def read_scan(scan: RawScan, enc: CartesianEncoding, params: Mapping[str, Any], progress: ProgressFn,
              share: float) -> KspaceBuffer:
    """Buffer all readouts of ``scan``; progress runs from 0 to ``share``."""
    buffer = KspaceBuffer(enc, keep_averages=_flag(params, "keep_averages", False))
    system = scan.header.acquisitionSystemInformation
    channels = int(system.receiverChannels) if system is not None and system.receiverChannels else None
    progress(0.0, "reading")
    for chunk in scan.iter_chunks(_count_param(params, "chunk", 2048)):
        check_readouts(chunk.start, chunk.heads, chunk.data, channels)
        buffer.add(chunk.heads, chunk.data)
        progress(share * (chunk.start + len(chunk.heads)) / len(scan), "reading")
    if not buffer.volume_keys():
        raise ReconError(f"{scan.path.name}: no imaging readouts ({buffer.skipped} skipped)")
    return buffer


def check_readouts(start: int, heads: np.ndarray, data: list[np.ndarray], channels: int | None) -> None:
    """Refuse, naming the readout, data no recon can be right from: imaging or noise readouts with no
    samples, samples that are NaN or Inf, or another channel count than the header's ``receiverChannels``."""
    used = np.flatnonzero(imaging_mask(heads) | noise_mask(heads))
    for i in used:
        n, ksp = start + int(i), data[i]
        if ksp.shape[-1] == 0:
            raise ReconError(f"readout {n} has no samples")
        if channels is not None and ksp.shape[0] != channels:
            raise ReconError(f"readout {n} has {ksp.shape[0]} channels, the header's receiverChannels {channels}")
        if not np.isfinite(ksp).all():
            raise ReconError(f"readout {n} holds samples that are not finite (NaN or Inf)")


def _images(name: str, scan: RawScan, params: Mapping[str, Any], mags: list, geometry: list,
            progress: ProgressFn) -> list[ismrmrd.Image]:
    progress(0.9, "images")
    if not any(float(np.max(m, initial=0.0)) > 0 for m in mags):
        raise ReconError(f"{name}: every pixel of the images is 0: the readouts hold no signal")
    images = to_mrd_images(np.concatenate(mags), geometry, scan.header,
                           series_index=int(params.get("series_index", 1)),
                           description=str(params.get("description", name)),
                           history=("RECONQ", name))
    progress(1.0, "images")
    logger.info("%s: %s, %d images from %d volumes", scan.path.name, name, len(images), len(mags))
    return images


def _flag(params: Mapping[str, Any], name: str, default: bool) -> bool:
    value = params.get(name, default)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _device(value: Any) -> sp.Device:
    try:
        return sp.Device(int(value))
    except (TypeError, ValueError) as e:
        raise ReconError(f"device {value!r} is not usable: {e}") from e


def run_radial(scan: RawScan, params: Mapping[str, Any], progress: ProgressFn,
               name: str = "radial") -> list[ismrmrd.Image]:
    """The ``radial`` pipeline's recon (params: :class:`~reconq.recon.pipelines.RadialPipeline`)."""
    from reconq.recon import radial  # noqa: PLC0415 (the NUFFT stack, only for radial jobs)
    from reconq.recon.radialdata import RadialEncoding, read_radial  # noqa: PLC0415

    enc = RadialEncoding.from_header(scan.header)
    opts = _radial_options(params)
    heads, trajectories, enc = _sequence_trajectories(scan, enc, params)
    data = read_radial(scan, enc, progress, 0.4, heads=heads, trajectories=trajectories,
                       chunk=_count_param(params, "chunk", 2048))
    kind = data.kind if data.kind != "3d" else radial.trajectory_kind(data.volumes[min(data.volumes)].stacked()[0])
    w = whitener(data) if _flag(params, "prewhiten", True) else None
    device = _device(params.get("device", -1))
    shape = enc.grid_shape(kind)
    threads = _count_param(params, "threads", fft.WORKERS)
    mags: dict[tuple, np.ndarray] = {}
    groups = data.groups()
    for i, keys in enumerate(groups):
        progress(0.4 + 0.5 * i / len(groups), "nufft")
        stacked = [data.volumes[k].stacked() for k in keys]
        coord = stacked[0][0]
        ksp = np.stack([s[1] if w is None else prewhiten(s[1], w) for s in stacked])  # (nvol, ncoil, nread, ns)
        with device:
            img = radial.reconstruct(sp.to_device(coord, device), sp.to_device(ksp, device), shape, kind, opts,
                                     threads=threads)
        for k, m in zip(keys, sp.to_device(img, sp.cpu_device), strict=True):
            mags[k] = m.reshape((-1,) + m.shape[-2:]).astype(np.float32)
    keys = sorted(mags)
    geometry = [g for k in keys for g in data.geometries(k)]
    return _images(name, scan, params, [mags[k] for k in keys], geometry, progress)


def _radial_options(params: Mapping[str, Any]):
    from reconq.recon.radial import RadialOptions  # noqa: PLC0415

    casts = {"dcf": str, "combine": str, "niter": int, "lamda": float, "eps": float, "lowres": float}
    try:
        options = {k: cast(params[k]) for k, cast in casts.items() if k in params}
        return RadialOptions(**options, toeplitz=_flag(params, "toeplitz", True))
    except (TypeError, ValueError) as e:
        raise ReconError(f"invalid radial parameter: {e}") from e


def _count_param(params: Mapping[str, Any], name: str, default: int) -> int:
    """A positive whole-number parameter (``chunk``, ``threads``), or a ReconError that names it."""
    try:
        value = int(params.get(name, default) or default)
    except (TypeError, ValueError) as e:
        raise ReconError(f"{name}={params[name]!r}: must be a positive whole number") from e
    if value < 1:
        raise ReconError(f"{name}={value}: must be a positive whole number")
    return value


def _sequence_trajectories(scan: RawScan, enc, params: Mapping[str, Any]):
    """Headers and trajectories from the Pulseq sequence a scan names, else ``(None, None, enc)``.

    The sequence's labels set the counters they name; its trajectory, in cycles per encoded FOV, stands
    for the readouts' ``traj``; a 2D scan keeps the in-plane axes (the sequence's ``kz`` must be 0).
    """
    from dataclasses import replace  # noqa: PLC0415

    from reconq.recon import pulseq  # noqa: PLC0415

    signature, seq_file = pulseq.signature_from_header(scan.header)
    if signature is None:
        return None, None, enc
    folder = params.get("sequence_dir")
    if not folder:
        raise ReconError(f"the scan names Pulseq sequence {signature} but this worker has no sequence "
                         "folder (RECONQ_SEQUENCE_DIR)")
    path = pulseq.SequenceLibrary(Path(folder)).find(signature, seq_file)
    traj = pulseq.load_trajectory(path)
    per_acq = pulseq.scan_trajectories(traj, scan.heads, enc.enc_fov)  # cycles per the sequence's FOV
    seq_fov = [f * 1000 if f is not None and np.isfinite(f) and f > 0 else e
               for f, e in zip(traj.fov_m or (None,) * 3, enc.enc_fov, strict=True)]
    to_encoded = np.array([e / f if f > 0 else 1.0 for e, f in zip(enc.enc_fov, seq_fov, strict=True)], np.float32)
    per_acq = [t * to_encoded if t is not None else None for t in per_acq]  # cycles per encoded FOV
    heads = scan.heads.copy()
    imaging = np.flatnonzero(~noise_mask(heads))
    for field_name, values in traj.labels.items():
        heads["idx"][field_name][imaging] = values
    if enc.enc_matrix[2] == 1 and enc.recon_matrix[2] == 1:
        for n, t in enumerate(per_acq):
            if t is not None and np.abs(t[:, 2]).max() > 1e-3:
                raise ReconError(f"sequence {signature} ({path.name}): acquisition {n} leaves the plane "
                                 "(kz ≠ 0) but the header encodes a 2D scan")
        per_acq = [t[:, :2] if t is not None else None for t in per_acq]
    logger.info("trajectories from Pulseq sequence %s (%s)", signature, path.name)
    return heads, per_acq, replace(enc, units="cycles_per_fov")


def run_alignsense(scan: RawScan, params: Mapping[str, Any], progress: ProgressFn,
                   name: str = "alignsense") -> list[ismrmrd.Image]:
    """The ``alignsense`` pipeline's recon (params: :class:`~reconq.recon.pipelines.AlignSensePipeline`)."""
    from reconq.recon import alignsense  # noqa: PLC0415 (the motion solver, only for alignsense jobs)
    from reconq.recon.senserecon import readout_transform, solve_grid, volume_maps  # noqa: PLC0415

    enc = CartesianEncoding.from_header(scan.header)
    sense_opts = _sense_options(params)
    opts = _align_options(params, alignsense)
    buffer = read_scan(scan, enc, params, progress, 0.2)
    w = whitener(buffer) if sense_opts.prewhiten else None
    shots = shot_masks(scan, enc, params)
    reference = _reference(params, sense_opts, progress) if params.get("reference") else None
    device = _device(params.get("device", -1))
    keys = buffer.volume_keys()
    corrected, plain, geometry, motion_rows = [], [], [], []
    image_volumes: list[str] = []  # the volume each image is of, in image order
    compare = _flag(params, "compare", False)
    fold = 1
    for i, key in enumerate(keys):
        masks = shots.get(key)
        volume = _volume_name(key, enc)
        grid = solve_grid(buffer.centre_head(key), enc)
        fold = _fold(params, reference, grid, enc)
        ok, why = alignsense.correctable(masks) if masks is not None else (False, "no shots")
        if ok:
            ok, why = _isotropic(grid, enc)
        if not ok:
            warn(progress, f"{volume}: motion not corrected ({why}); plain SENSE images")
        if compare or (not ok and fold == 1):
            img = sense_volume(buffer, key, scan.header, sense_opts, device, reference, w)
            plain.append(np.abs(sp.to_device(img, sp.cpu_device)).astype(np.float32))
        if not ok and fold == 1:
            corrected.append(plain[-1])
        else:  # motion corrected, or (not correctable) plain SENSE on the reference's larger FOV
            if masks is None:  # no shots: the lines acquired, as one
                masks = buffer.sampled(key)[None]
            def stage(fraction: float, what: str, i: int = i) -> None:
                progress(0.25 + 0.65 * (i + fraction) / len(keys), what)

            with device:
                ksp = sp.to_device(buffer.kspace(key), device)
                if w is not None:
                    ksp = prewhiten(ksp, w)
                if fold > 1:  # solve on the reference's larger FOV: the scan's lines every fold-th there
                    grid, ksp, masks = _widened(grid, ksp, masks, fold)
                maps = volume_maps(buffer, key, ksp, grid, sense_opts, device, reference, w)
                kgrid = fft.fft(readout_transform(ksp, enc), axes=(-1,))  # (ncoil, nz, ny_enc, nx_recon)
                del ksp
                mps = alignsense.extend_maps(maps.full())  # the object leaves the calibration's support
                if not enc.is3d:  # 2D: the solver's arrays have no z axis
                    kgrid, mps, masks = kgrid[:, 0], mps[:, 0], masks[:, 0]
                if ok:
                    result = alignsense.align_sense(kgrid, mps, masks, opts, progress=stage)
                    img = result.image
                else:
                    img = alignsense.sense(kgrid, mps, masks)
                img = to_recon_space(img if enc.is3d else img[None], _widened_encoding(enc, fold))
            corrected.append(np.abs(sp.to_device(img, sp.cpu_device)).astype(np.float32))
            if ok:
                motion_rows += _motion_rows(volume, result.motion, grid, enc)
                logger.info("%s, %s: %d shots, %d iterations, converged %s", name, volume, len(masks),
                            result.iterations, result.converged)
                if not result.converged:
                    warn(progress, f"{volume}: motion estimate did not converge in {result.iterations} iterations")
        volume_geometry = image_geometries(buffer, key)
        geometry += volume_geometry
        image_volumes += [volume] * len(volume_geometry)
    if motion_rows:
        report(progress, "motion", {"title": "Motion per shot", "columns": list(MOTION_COLUMNS), "rows": motion_rows})
    if fold > 1:  # the images cover the reference's FOV: their header says so
        wide = copy.deepcopy(scan.header)
        space = wide.encoding[0].reconSpace
        space.matrixSize.y, space.fieldOfView_mm.y = space.matrixSize.y * fold, space.fieldOfView_mm.y * fold
        progress(0.9, "images")
        images = to_mrd_images(np.concatenate(corrected), geometry, wide,
                               series_index=int(params.get("series_index", 1)),
                               description=str(params.get("description", name)), history=("RECONQ", name))
    else:
        images = _images(name, scan, params, corrected, geometry, progress)
    if compare and plain:
        series = int(params.get("series_index", 1)) + 1
        images += to_mrd_images(np.concatenate(plain), geometry, scan.header, series_index=series,
                                description=f"{params.get('description', name)} uncorrected",
                                history=("RECONQ", name, "uncorrected"))
    _motion_meta(images, motion_rows, image_volumes)
    return images


def _fold(params: Mapping[str, Any], reference, grid, enc: CartesianEncoding) -> int:
    """How many times the reference's phase FOV holds the scan's, when the job asks for the reference's
    FOV (``fov: reference``); 1 otherwise. Needs a reference scan of the same orientation."""
    if str(params.get("fov", "scan")) != "reference":
        if str(params.get("fov", "scan")) != "scan":
            raise ReconError(f"fov={params['fov']!r}: must be 'scan' (the default) or 'reference'")
        return 1
    if reference is None:
        raise ReconError("fov=reference needs a reference scan (reference_protocol or reference_scan)")
    _, ref_grid = reference
    if not np.allclose(ref_grid.dirs, grid.dirs, atol=1e-3):
        raise ReconError("fov=reference needs a reference scan of the scan's orientation")
    if enc.enc_matrix[1] != enc.recon_matrix[1]:
        raise ReconError("fov=reference needs a scan without phase oversampling")
    ratio = (ref_grid.spacing[1] * ref_grid.shape[1]) / (grid.spacing[1] * grid.shape[1])
    fold = int(np.ceil(ratio - 1e-3))
    if fold < 2:
        logger.info("the reference's FOV (%.1fx the scan's) is not larger: the scan's FOV kept", ratio)
    return max(fold, 1)


def _isotropic(grid, enc: CartesianEncoding) -> tuple[bool, str]:
    """Whether the solve grid's voxels are cubes (squares in 2D), as the rigid model needs: it rotates
    voxel coordinates, so unequal sides would make a rotation a shear and the mm and degrees wrong."""
    sides = grid.spacing[:3] if enc.is3d else grid.spacing[:2]
    if np.ptp(sides) > 0.01 * float(np.min(sides)):
        return False, "voxels of " + " x ".join(f"{v:.3g}" for v in sides) + " mm: the rigid model needs them equal"
    return True, ""


def _widened_encoding(enc: CartesianEncoding, fold: int) -> CartesianEncoding:
    """The encoding of the solve on ``fold`` times the phase FOV (same voxels)."""
    if fold == 1:
        return enc
    from dataclasses import replace  # noqa: PLC0415

    def wide(v: tuple, times: float) -> tuple:
        return (v[0], type(v[1])(v[1] * times), v[2])

    return replace(enc, enc_matrix=wide(enc.enc_matrix, fold), recon_matrix=wide(enc.recon_matrix, fold),
                   enc_fov=wide(enc.enc_fov, fold), recon_fov=wide(enc.recon_fov, fold),
                   centre_e1=enc.centre_e1 * fold)


def _widened(grid, ksp, masks: np.ndarray, fold: int):
    """The solve grid with ``fold`` times the phase FOV (same voxels), the scan's k-space lines and shot
    masks placed every ``fold``-th line of it (k-space spacing 1/FOV: ``fold`` times finer there)."""
    from reconq.recon.geometry import Grid  # noqa: PLC0415

    nz, ny, nx = grid.shape
    wide = Grid.make(grid.centre, grid.dirs, grid.spacing, (nz, ny * fold, nx))
    rows = fold * (np.arange(ny) - ny // 2) + (ny * fold) // 2
    xp = sp.get_array_module(ksp)
    out = xp.zeros(ksp.shape[:2] + (ny * fold,) + ksp.shape[3:], dtype=ksp.dtype)
    out[:, :, rows] = ksp * np.float32(np.sqrt(fold))  # the unitary FFT's scale on the longer axis
    wide_masks = np.zeros(masks.shape[:2] + (ny * fold,), dtype=bool)
    wide_masks[:, :, rows] = masks
    return wide, out, wide_masks


#: The motion table's columns: translations in mm and rotations in degrees about the read, phase and slice
#: axes of the scan (the prescription's frame), per shot, relative to the mean position of all shots.
MOTION_COLUMNS = ("volume", "shot", "read mm", "phase mm", "slice mm", "read °", "phase °", "slice °")


def _volume_name(key: tuple, enc: CartesianEncoding) -> str:
    names = ("slice", "contrast", "phase", "repetition", "set", "average")
    parts = [f"{n} {v}" for n, v in zip(names, key, strict=False) if v or (n == "slice" and not enc.is3d)]
    return ", ".join(parts) or "volume"


def _motion_rows(volume: str, motion: np.ndarray, grid, enc: CartesianEncoding) -> list[list]:
    """Per shot: voxels and degrees in image axes (z, y, x) to mm and degrees about read, phase, slice."""
    dz, dy, dx = grid.spacing[2], grid.spacing[1], grid.spacing[0]
    rows = []
    for s, m in enumerate(np.asarray(motion, dtype=np.float64)):
        if len(m) == 3:  # 2D: (ty, tx, rotation in-plane, about the slice axis)
            t_read, t_phase, t_slice, r = m[1] * dx, m[0] * dy, 0.0, (0.0, 0.0, m[2])
        else:  # 3D: (tz, ty, tx, rz, ry, rx): rotations about z (slice), y (phase), x (read)
            t_read, t_phase, t_slice, r = m[2] * dx, m[1] * dy, m[0] * dz, (m[5], m[4], m[3])
        rows.append([volume, s, *(round(float(v), 4) for v in (t_read, t_phase, t_slice, *r))])
    return rows


def _motion_meta(images: list[ismrmrd.Image], rows: list[list], volumes: list[str]) -> None:
    """Every image carries its volume's motion per shot in its meta (``ReconQMotion``: one text per shot);
    ``volumes``: the volume of each image of a series (the series repeat it)."""
    by_volume: dict[str, list[str]] = {}
    for row in rows:
        by_volume.setdefault(row[0], []).append(" ".join(f"{v:g}" for v in row[2:]))
    for i, image in enumerate(images):
        shots = by_volume.get(volumes[i % len(volumes)])
        if shots is None:  # a volume left uncorrected
            continue
        meta = ismrmrd.Meta.deserialize(image.attribute_string) if image.attribute_string else ismrmrd.Meta()
        meta["ReconQMotion"] = shots
        meta["ReconQMotionUnits"] = "read_mm phase_mm slice_mm read_deg phase_deg slice_deg"
        image.attribute_string = meta.serialize()


def _align_options(params: Mapping[str, Any], alignsense):
    casts: dict[str, Callable[[Any], Any]] = {
        "max_iterations": int, "cg_iterations": int, "levels": lambda v: tuple(float(f) for f in v),
        "translation_tol": float, "rotation_tol": float}
    try:
        known = {k: cast(params[k]) for k, cast in casts.items() if k in params}
        return alignsense.AlignOptions(**known).validate()
    except (TypeError, ValueError) as e:
        raise ReconError(f"invalid alignsense parameter: {e}") from e


def shot_masks(scan: RawScan, enc: CartesianEncoding, params: Mapping[str, Any]) -> dict[tuple, np.ndarray]:
    """Per volume, ``(nshot, nz, ny)`` bool: the phase-encode lines each shot acquired.

    Shots are, in this order: ``len / shots`` consecutive readouts (in acquisition order) when the job
    parameter ``shots`` is given; the readouts' ``idx.segment`` where the sequence sets it; blocks of
    ``encoding.echoTrainLength`` consecutive readouts.
    """

    heads = scan.heads[imaging_mask(scan.heads)]
    if not len(heads):
        return {}
    segment = heads["idx"]["segment"].astype(np.int64)
    etl = scan.header.encoding[0].echoTrainLength
    if params.get("shots") is not None:
        try:
            nshot = int(params["shots"])
        except (TypeError, ValueError) as e:
            raise ReconError(f"shots={params['shots']!r}: must be a whole number of shots") from e
        if not 1 <= nshot <= len(heads):
            raise ReconError(f"shots={nshot}: must be 1..{len(heads)} (the scan's imaging readouts)")
        shot = None
    elif segment.any():
        shot = segment
    elif etl:
        shot = None
        nshot = 0
    else:
        raise ReconError("alignsense needs the shots: readouts' idx.segment, the header's "
                         "encoding.echoTrainLength, or the job parameter shots")
    nx, ny, nz = enc.enc_matrix
    keep = _flag(params, "keep_averages", False)
    rows_of: dict[tuple, list[int]] = {}
    for r, h in enumerate(heads):
        rows_of.setdefault(volume_key(h["idx"], keep), []).append(r)
    e1_all = heads["idx"]["kspace_encode_step_1"].astype(np.int64) - enc.centre_e1 + ny // 2
    e2_all = (heads["idx"]["kspace_encode_step_2"].astype(np.int64) - enc.centre_e2 + nz // 2 if nz > 1
              else np.zeros(len(heads), dtype=np.int64))
    out: dict[tuple, np.ndarray] = {}
    for key, rows in sorted(rows_of.items()):
        rows_a = np.asarray(rows)
        if shot is not None:
            labels = shot[rows_a]
        elif nshot:
            labels = np.arange(len(rows_a)) * nshot // len(rows_a)
        else:
            labels = np.arange(len(rows_a)) // int(etl)
        ids, which = np.unique(labels, return_inverse=True)
        masks = np.zeros((len(ids), nz, ny), dtype=bool)
        masks[which, e2_all[rows_a], e1_all[rows_a]] = True  # the buffer checked the lines lie inside
        out[key] = masks
    return out
