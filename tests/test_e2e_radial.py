"""Radial scans through the whole flow on real parts: scanner → gateway (TCP) → Redis → a Celery worker
process → retrieval scan. A 3D multi-echo kooshball carries its trajectory in ``acq.traj``; a Pulseq
scan carries none, and its trajectory comes from the ``.seq`` file (written by pypulseq here) that the
header names by signature, in the worker's sequence folder."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import redis

from reconq.core.jobs import JobStore
from reconq.core.settings import Settings, load_settings
from reconq.core.states import JobState
from reconq.gateway import client
from reconq.recon import pulseq, radial
from reconq.recon.phantoms import Phantom
from reconq.recon.radialsim import radial_scan


@pytest.fixture(scope="module")
def e2e_settings(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """This module's gateway and worker, with a sequence folder the worker reads."""
    root = tmp_path_factory.mktemp("e2e_radial")
    (root / "sequences").mkdir()
    return load_settings(data_dir=root / "data", redis_url=redis_server.url, mrd_port=0, min_free_bytes=0,
                         retrieve_wait_s=120.0, retrieve_poll_s=0.2, sequence_dir=root / "sequences")


@pytest.fixture(scope="module")
def store(e2e_settings: Settings) -> JobStore:
    return JobStore(redis.Redis.from_url(e2e_settings.redis_url or "", decode_responses=True))


def nrmse(got: np.ndarray, want: np.ndarray) -> float:
    """Normalised RMS error after the least-squares scale (the images are scaled to the uint16 range)."""
    got, want = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    scale = float(got @ want) / float(got @ got)
    return float(np.linalg.norm(scale * got - want) / np.linalg.norm(want))


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(img.data)[0, 0].astype(np.float32) for img in sorted(images, key=lambda i: i.slice)])


def wait_finished(store: JobStore, job_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job is not None and job.state in (JobState.DONE, JobState.FAILED):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {store.get(job_id)}")


def test_a_3d_multi_echo_kooshball_is_reconstructed_and_retrieved(gateway, worker, store) -> None:
    host, port = gateway
    n, te = 32, (2.0, 8.0)
    phantom = Phantom.default(3, ncoil=4, seed=1)
    coord = radial.kooshball(int(np.pi * n * n / 2), 2 * n, n / 2)
    rotation, _ = np.linalg.qr(np.array([[0.95, 0.2, 0.0], [-0.2, 0.95, 0.1], [0.0, -0.1, 0.99]]))
    scan = radial_scan(coord, lambda c, e: phantom.kspace(c, te_ms=te[e]), ncoil=4, matrix=(n, n, n),
                       fov_mm=(200.0, 200.0, 180.0), kind="3d", echoes=2, te_ms=te, rotation=rotation,
                       position=(5.0, 10.0, -20.0), protocol="e2e_kooshball", patient_id="KOOSH1")
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="radial")
    assert reply.closed and not reply.errors(), reply.texts
    back = client.retrieve(host, port, scan.header)
    assert back.closed and len(back.images) == 2 * n, back.texts

    thickness = 180.0 / n
    for e in (0, 1):
        echo = [img for img in back.images if img.contrast == e]
        assert len(echo) == n
        assert nrmse(pixels(echo), phantom.truth((n, n, n), te_ms=te[e])) < 0.16  # gridding: 0.119, 0.074
        for img in echo:
            want = np.array([5.0, 10.0, -20.0]) + (img.slice - n // 2) * thickness * rotation[:, 2]
            np.testing.assert_allclose(img.position, want, atol=1e-3)
            np.testing.assert_allclose(img.slice_dir, rotation[:, 2], atol=1e-5)
    job = store.get(reply.job_id())
    assert job is not None and job.state is JobState.DONE and job.pipeline == "radial"


def pulseq_scan(folder: Path, signature: str | None = None, seq_file: str | None = "radial_2echo.seq"):
    """A 2-echo 2D radial Pulseq scan: its samples taken at the sequence's own k-space, no ``acq.traj``,
    and no counters (the sequence's labels give spoke and echo); the ``.seq`` file in ``folder``.

    The readout is oversampled twice, as radial readouts are: 128 samples over the sequence's 512 mm FOV
    for a 64 x 64 image of 256 mm, so the trajectory's units pass through the sequence's own FOV."""
    seq = pulseq.example_radial_sequence(nspokes=100, ns=128, fov_m=0.512, echoes=2)
    path = folder / "radial_2echo.seq"
    seq.write(str(path))
    traj = pulseq.load_trajectory(path)
    coord = np.stack([a[:, [1, 0]] * 256e-3 for a in traj.adc])  # 1/m → cycles per 256 mm, (ky, kx)
    phantom = Phantom.default(2, ncoil=4, seed=2)
    scan = radial_scan(coord, lambda c, e: phantom.kspace(c), ncoil=4, matrix=(64, 64, 1),
                       fov_mm=(256.0, 256.0, 5.0), kind="2d", with_trajectory=False, protocol="e2e_pulseq",
                       patient_id="PULSEQ1", position=(0.0, 0.0, 12.0),
                       user_strings={"seq_signature": signature or traj.signature,
                                     **({"seq_file": seq_file} if seq_file else {})})
    for acq in scan.acquisitions:
        acq.idx.kspace_encode_step_1 = 0  # as the scanner sends a Pulseq scan: counters from labels
    return scan, phantom, traj


def test_a_pulseq_scan_gets_its_trajectory_from_the_sequence_file(gateway, worker, e2e_settings) -> None:
    host, port = gateway
    scan, phantom, _ = pulseq_scan(e2e_settings.sequence_folder)
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="radial")
    assert reply.closed and not reply.errors(), reply.texts
    back = client.retrieve(host, port, scan.header)
    assert back.closed and len(back.images) == 2, back.texts  # the ECO label: two echoes
    assert sorted(img.contrast for img in back.images) == [0, 1]
    truth = phantom.truth((64, 64))
    for img in back.images:
        assert nrmse(np.asarray(img.data)[0, 0], truth) < 0.06  # measured 0.029
        np.testing.assert_allclose(img.position, (0.0, 0.0, 12.0), atol=1e-4)
        np.testing.assert_allclose(img.field_of_view, (256.0, 256.0, 5.0), atol=1e-4)


@pytest.mark.parametrize("case", ["wrong signature", "missing file"])
def test_a_pulseq_scan_whose_sequence_is_not_there_fails_naming_it(gateway, worker, e2e_settings, store,
                                                                   tmp_path, case) -> None:
    host, port = gateway
    if case == "wrong signature":
        signature = "0123456789abcdef0123456789abcdef"
        scan, _, _ = pulseq_scan(e2e_settings.sequence_folder, signature=signature)
    else:  # a sequence the admin never added to the folder
        other = pulseq.example_radial_sequence(nspokes=90, ns=128, fov_m=0.512, echoes=2)
        other.write(str(tmp_path / "other.seq"))
        signature = pulseq.seq_signature(tmp_path / "other.seq").computed
        scan, _, _ = pulseq_scan(e2e_settings.sequence_folder, signature=signature, seq_file="other.seq")
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="radial")
    assert reply.closed and not reply.errors(), reply.texts
    job = wait_finished(store, reply.job_id())
    assert job.state is JobState.FAILED
    assert signature in job.error, job.error
    back = client.retrieve(host, port, scan.header)
    assert back.closed and not back.images
    assert back.texts[-1].startswith("ERR") and signature in back.texts[-1], back.texts
