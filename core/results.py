"""Result files: the MRD images of one job, ``/dataset/image_<series>`` as ``ismrmrd.Dataset`` writes them,
and the scan's MRD header in ``/dataset/xml`` (UTF-8 bytes: a patient ``Müller^Jørgen`` stays as he is)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import ismrmrd

from reconq.core.mrdfile import read_xml
from reconq.core.storage import ScanStore, fsync_path

if TYPE_CHECKING:
    from reconq.core.jobs import Job


def result_file(scans: ScanStore, job: Job) -> Path:
    """The images of the job's run ``job.attempts``: ``scans/<scan_id>/results/<job_id>-run<n>.h5``.

    The one place result files are named: the worker writes there (``attempts`` is its run's number) and the
    API and retrieval scans read there (``attempts`` of a done job is the run that finished it). Derived from
    the ids alone under this data root, never from a path in a job record (whoever writes Redis cannot
    point a reader at another file); ValueError for an id that is no file name (``/``, a leading dot, NUL)
    or a negative run."""
    folder = scans.folder(job.scan_id)  # refuses '' and ids with '/' or a leading dot
    job_id, run = job.id, int(job.attempts)
    if not job_id or job_id.startswith(".") or any(c in job_id for c in "/\\\0") or len(job_id) > 200:
        raise ValueError(f"not a job id: {job_id!r}")
    if "\0" in job.scan_id:
        raise ValueError(f"not a scan id: {job.scan_id!r}")
    if run < 0:
        raise ValueError(f"job {job_id}: not a run number: {run}")
    return folder / "results" / f"{job_id}-run{run}.h5"


def write_images(path: Path, images: Sequence[ismrmrd.Image], xml: str | None = None) -> None:
    """Write ``images`` (grouped by ``image_series_index``) and the header ``xml`` durably: temp file,
    fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with ismrmrd.Dataset(str(tmp), "dataset", create_if_needed=True) as dset:
        if xml is not None:
            # the dataset holds bytes (vlen=bytes): h5py would encode a str as ASCII and refuse a non-ASCII name
            dset.write_xml_header(xml.encode("utf-8"))
        for image in images:
            dset.append_image(f"image_{image.image_series_index}", image)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_images(path: Path) -> list[ismrmrd.Image]:
    """Every image of a result file, by series, then in stored order."""
    out: list[ismrmrd.Image] = []
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False, mode="r") as dset:
        groups = sorted(
            (k for k in dset.list() if k.startswith("image_")), key=lambda k: (len(k), k)
        )
        for group in groups:
            out.extend(dset.read_image(group, i) for i in range(dset.number_of_images(group)))
    return out


def read_result_xml(path: Path) -> str | None:
    """The MRD header XML stored with a result file, or None where it was written without one.

    Raises :class:`reconq.core.mrdfile.MrdFileError` where the stored header is not UTF-8."""
    with h5py.File(path, "r") as file:
        if "xml" not in file.get("dataset", {}):
            return None
    return read_xml(path)
