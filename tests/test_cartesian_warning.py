"""A `cartesian` recon of a scan whose header declares parallel-imaging acceleration warns, on the job and in
the images' comments, suggesting `sense`; a fully sampled scan gets no warning."""

from __future__ import annotations

from pathlib import Path

import ismrmrd
import redis

from reconq.core.jobs import Job, JobStore
from reconq.core.results import read_images
from reconq.core.settings import load_settings
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.recon.rawdata import RawScan
from reconq.recon.registry import get_pipeline
from reconq.recon.runs import declared_acceleration
from reconq.recon.simulate import synthetic_scan, write_mrd


class Progress:
    """A progress callback that keeps the warnings, as the worker's ProgressReporter does."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def __call__(self, fraction: float, stage: str) -> None:
        pass

    def warn(self, text: str) -> None:
        self.warnings.append(text)


def comments(image: ismrmrd.Image) -> list[str]:
    meta = ismrmrd.Meta.deserialize(image.attribute_string) if image.attribute_string else ismrmrd.Meta()
    value = meta.get("ImageComments", [])
    return value if isinstance(value, list) else [value]


def cartesian(path: Path, **scan) -> tuple[list[ismrmrd.Image], list[str]]:
    progress = Progress()
    with RawScan.open(write_mrd(synthetic_scan(matrix=(32, 32), ncoil=4, **scan), path)) as raw:
        images = get_pipeline("cartesian").run(raw, {}, progress)
    return images, progress.warnings


def test_an_accelerated_scan_warns_and_says_so_in_every_image(tmp_path):
    images, warnings = cartesian(tmp_path / "r2.h5", acceleration=(2, 1), acs_lines=(8, 1))
    assert len(warnings) == 1, warnings
    assert "acceleration 2 x 1" in warnings[0] and "sense" in warnings[0] and "fold" in warnings[0]
    assert images and all(warnings[0] in comments(im) for im in images)


def test_acceleration_along_the_second_phase_axis_warns_too(tmp_path):
    images, warnings = cartesian(tmp_path / "r3d.h5", nz=8, acceleration=(1, 2), acs_lines=(8, 4))
    assert len(warnings) == 1 and "acceleration 1 x 2" in warnings[0], warnings
    assert all(warnings[0] in comments(im) for im in images)


def test_a_fully_sampled_scan_gets_no_warning(tmp_path):
    images, warnings = cartesian(tmp_path / "full.h5")
    assert warnings == []
    assert images and not any("sense" in c for im in images for c in comments(im))


def test_a_header_without_parallel_imaging_declares_none():
    scan = synthetic_scan(matrix=(8, 8), ncoil=2)
    scan.header.encoding[0].parallelImaging = None
    assert declared_acceleration(scan.header) == (1, 1)
    assert declared_acceleration(synthetic_scan(matrix=(16, 16), ncoil=2, acceleration=(3, 1),
                                                acs_lines=(4, 1)).header) == (3, 1)


def test_the_warning_is_on_the_job_and_in_its_stored_images(redis_server, tmp_path):
    """In-process worker (a JobRunner on a real Redis): the job ends done with the warning (the retrieval
    sends job warnings as WRN), its log has the WRN line, and the result file's images carry the comment."""
    from reconq.scheduler.inventory import make_inventory
    from reconq.workers.slot import cpu_slot
    from reconq.workers.tasks import JobRunner

    url = redis_server.url.rsplit("/", 1)[0] + "/13"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    settings = load_settings(data_dir=tmp_path / "data", redis_url=url)
    raw = ScanStore(settings.data_dir).raw_path("accel")
    raw.parent.mkdir(parents=True)
    write_mrd(synthetic_scan(matrix=(32, 32), ncoil=4, acceleration=(2, 1), acs_lines=(8, 1)), raw)
    store = JobStore(client)
    store.create(Job(id="accel-j1", scan_id="accel", pipeline="cartesian"))
    runner = JobRunner(settings, store, "w-warn", cpu_slot(make_inventory(settings)))
    assert runner.run("accel-j1") == JobState.DONE.value
    job = store.get("accel-j1")
    assert job is not None and len(job.warnings) == 1 and "sense" in job.warnings[0], job.warnings
    assert any(line.startswith("WRN") or "WRN " in line for line in store.log_lines("accel-j1"))
    images = read_images(settings.data_dir / job.result_path)
    assert images and all(job.warnings[0] in comments(im) for im in images)
