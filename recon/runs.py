"""How the built-in pipelines reconstruct: the scan read into a k-space buffer, each volume reconstructed on
the device ``params["device"]`` names, and scanner images made.

:mod:`reconq.recon.pipelines` declares the pipelines; this module is imported when one of them runs.

References:
    Ning et al. Asynchronous inline reconstruction. Magn Reson Med 2026, doi 10.1002/mrm.70304.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ismrmrd
import numpy as np
import sigpy as sp

from reconq.recon import fft
from reconq.recon.cartesian import reconstruct
from reconq.recon.errors import ReconError
from reconq.recon.images import to_mrd_images
from reconq.recon.kspace import CartesianEncoding, KspaceBuffer, image_geometries, noise_mask, partial_fourier_extents
from reconq.recon.noise import noise_covariance, prewhiten, whitening_matrix
from reconq.recon.pipeline import ProgressFn, report, warn
from reconq.recon.rawdata import RawScan
from reconq.recon.senserecon import SenseOptions, reference_maps, sense_volume, to_recon_space, whitener

logger = logging.getLogger(__name__)


def run_cartesian(scan: RawScan, params: Mapping[str, Any], progress: ProgressFn,
                  name: str = "cartesian") -> list[ismrmrd.Image]:
    """The ``cartesian`` pipeline's recon (params: :class:`~reconq.recon.pipelines.CartesianPipeline`)."""
    enc = CartesianEncoding.from_header(scan.header)
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
    return _images(name, scan, params, mags, geometry, progress)


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
    progress(0.0, "reading")
    for chunk in scan.iter_chunks(int(params.get("chunk", 2048))):
        buffer.add(chunk.heads, chunk.data)
        progress(share * (chunk.start + len(chunk.heads)) / len(scan), "reading")
    if not buffer.volume_keys():
        raise ReconError(f"{scan.path}: no imaging readouts ({buffer.skipped} skipped)")
    return buffer


def _images(name: str, scan: RawScan, params: Mapping[str, Any], mags: list, geometry: list,
            progress: ProgressFn) -> list[ismrmrd.Image]:
    progress(0.9, "images")
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
                       chunk=int(params.get("chunk", 2048)))
    kind = _stack_if_flat(data)
    w = None
    if _flag(params, "prewhiten", True) and data.noise:
        w = whitening_matrix(noise_covariance(data.noise_samples()), data.noise_dwell_us, data.dwell_us)
    device = _device(params.get("device", -1))
    shape = enc.grid_shape(kind)
    threads = int(params.get("threads", 0)) or fft.WORKERS
    mags: dict[tuple, np.ndarray] = {}
    groups = data.groups()
    for i, keys in enumerate(groups):
        progress(0.4 + 0.5 * i / len(groups), "nufft")
        coord = data.volumes[keys[0]].stacked()[0]
        ksp = np.stack([data.volumes[k].stacked()[1] for k in keys])  # (nvol, ncoil, nreadouts, ns)
        if w is not None:
            ksp = np.einsum("ij,vj...->vi...", w, ksp).astype(np.complex64)
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

    casts = {"dcf": str, "combine": str, "niter": int, "lamda": float, "eps": float, "lowres": float,
             "toeplitz": lambda v: _flag({"v": v}, "v", True)}
    try:
        return RadialOptions(**{k: cast(params[k]) for k, cast in casts.items() if k in params})
    except (TypeError, ValueError) as e:
        raise ReconError(f"invalid radial parameter: {e}") from e


def _stack_if_flat(data) -> str:
    """A 3D trajectory whose every readout keeps one ``kz`` is a stack of stars (its DCF is in-plane)."""
    if data.kind != "3d":
        return data.kind
    flat = all(np.ptp(c[:, 0]) < 1e-4 for v in data.volumes.values() for c in v.coords)
    return "stack" if flat else "3d"


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
                raise ReconError(f"sequence {signature} ({path.name}): ADC event {n} leaves the plane "
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
    for i, key in enumerate(keys):
        masks = shots.get(key)
        ok, why = alignsense.correctable(masks) if masks is not None else (False, "no shots")
        volume = _volume_name(key, enc)
        if not ok:
            warn(progress, f"{volume}: motion not corrected ({why}); plain SENSE images")
        if not ok or compare:
            img = sense_volume(buffer, key, scan.header, sense_opts, device, reference, w)
            plain.append(np.abs(sp.to_device(img, sp.cpu_device)).astype(np.float32))
        if ok:
            def stage(fraction: float, what: str, i: int = i) -> None:
                progress(0.25 + 0.65 * (i + fraction) / len(keys), what)

            with device:
                ksp = sp.to_device(buffer.kspace(key), device)
                if w is not None:
                    ksp = prewhiten(ksp, w)
                grid = solve_grid(buffer.centre_head(key), enc)
                fold = _fold(params, reference, grid, enc)
                if fold > 1:  # solve on the reference's larger FOV: the scan's lines every fold-th there
                    grid, ksp, masks = _widened(grid, ksp, masks, fold)
                maps = volume_maps(buffer, key, ksp, grid, sense_opts, device, reference, w)
                kgrid = fft.fft(readout_transform(ksp, enc), axes=(-1,))  # (ncoil, nz, ny_enc, nx_recon)
                del ksp
                mps = alignsense.extend_maps(maps.full())  # the object leaves the calibration's support
                squeeze = not enc.is3d
                result = alignsense.align_sense(kgrid[:, 0] if squeeze else kgrid, mps[:, 0] if squeeze else mps,
                                                masks[:, 0] if squeeze else masks, opts, progress=stage)
                img = result.image[None] if squeeze else result.image
                img = to_recon_space(img, enc) if fold == 1 else img
            corrected.append(np.abs(sp.to_device(img, sp.cpu_device)).astype(np.float32))
            motion_rows += _motion_rows(volume, result.motion, grid, enc)
            logger.info("%s: %s, %s: %d shots, %d iterations, converged %s", scan.path.name, name, volume,
                        len(masks), result.iterations, result.converged)
            if not result.converged:
                warn(progress, f"{volume}: motion estimate did not converge in {result.iterations} iterations")
        else:
            corrected.append(plain[-1])
        volume_geometry = image_geometries(buffer, key)
        geometry += volume_geometry
        image_volumes += [volume] * len(volume_geometry)
    if motion_rows:
        report(progress, "motion", {"title": "Motion per shot", "columns": list(MOTION_COLUMNS), "rows": motion_rows})
    fold = max((m.shape[-2] // enc.recon_matrix[1] for m in corrected), default=1)
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
    casts = {"max_iterations": int, "cg_iterations": int, "levels": lambda v: tuple(float(f) for f in v),
             "translation_tol": float, "rotation_tol": float}
    try:
        known = {k: cast(params[k]) for k, cast in casts.items() if k in params}
        return alignsense.AlignOptions(**known).validate()
    except (TypeError, ValueError) as e:
        raise ReconError(f"invalid alignsense parameter: {e}") from e


def shot_masks(scan: RawScan, enc: CartesianEncoding, params: Mapping[str, Any]) -> dict[tuple, np.ndarray]:
    """Per volume, ``(nshot, nz, ny)`` bool: the phase-encode lines each shot acquired.

    Shots are ``idx.segment`` where the sequence sets it; otherwise consecutive blocks, in acquisition
    order, of ``encoding.echoTrainLength`` readouts, or of ``len / shots`` readouts with the job parameter
    ``shots`` (which wins over the echo train length).
    """
    from reconq.recon.kspace import _volume_key, imaging_mask  # noqa: PLC0415

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
    keys = [_volume_key(h["idx"], _flag(params, "keep_averages", False)) for h in heads]
    out: dict[tuple, list] = {}
    for key in sorted(set(keys)):
        rows = np.flatnonzero([k == key for k in keys])
        if shot is not None:
            labels = shot[rows]
        elif nshot:
            labels = np.arange(len(rows)) * nshot // len(rows)
        else:
            labels = np.arange(len(rows)) // int(etl)
        ids = np.unique(labels)
        masks = np.zeros((len(ids), nz, ny), dtype=bool)
        for r, label in zip(rows, labels, strict=True):
            e1 = int(heads[r]["idx"]["kspace_encode_step_1"]) - enc.centre_e1 + ny // 2
            e2 = int(heads[r]["idx"]["kspace_encode_step_2"]) - enc.centre_e2 + nz // 2 if nz > 1 else 0
            masks[np.searchsorted(ids, label), e2, e1] = True
        out[key] = masks
    return out
