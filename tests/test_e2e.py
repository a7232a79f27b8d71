"""The whole flow on real parts: scanner → gateway (TCP) → Redis → Celery worker process → retrieval scan."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from reconq.core.jobs import JobStore
from reconq.core.states import JobState
from reconq.demo import expected_magnitude, nrmse
from reconq.gateway import client
from reconq.recon.simulate import synthetic_scan

#: Retrieved images of a noiseless phantom must match it to this normalised RMS error (uint16 rounding
#: of a 12-bit range is about 1e-4 of the maximum).
NRMSE_BOUND = 0.01


def centre_acquisitions(scan) -> dict[int, object]:
    """Per slice, the readout at the k-space centre line."""
    centre = scan.header.encoding[0].encodingLimits.kspace_encoding_step_1.center
    out = {}
    for acq in scan.acquisitions:
        if acq.idx.kspace_encode_step_1 == centre and not acq.is_flag_set(1 << 18):  # skip noise
            out.setdefault(acq.idx.slice, acq)
    return out


@pytest.mark.parametrize("nslices", [1, 3])
def test_scan_is_reconstructed_and_retrieved(gateway, worker, e2e_settings, nslices: int) -> None:
    host, port = gateway
    rotation = np.array([[0.9, -0.3, 0.3], [0.3, 0.95, 0.0], [-0.3, 0.1, 0.95]])
    rotation, _ = np.linalg.qr(rotation)  # an oblique, orthonormal prescription
    scan = synthetic_scan(matrix=(96, 80), ncoil=6, nslices=nslices, rotation=rotation,
                          position=(10.0, -20.0, 35.0), protocol=f"e2e_{nslices}", patient_id=f"E2E{nslices}")
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian")
    assert reply.closed and not reply.errors(), reply.texts
    job_id = reply.job_id()
    assert job_id is not None

    back = client.retrieve(host, port, scan.header)
    assert back.closed and back.images, back.texts
    assert len(back.images) == nslices

    got = np.stack([np.asarray(img.data)[0, 0].astype(np.float32) for img in back.images])
    assert got.shape == scan.truth.shape  # readout oversampling removed, cropped to the recon space
    assert nrmse(got, expected_magnitude(scan.truth, scan.mps)) < NRMSE_BOUND

    centres = centre_acquisitions(scan)
    for img in back.images:
        acq = centres[img.slice]
        for field in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position"):
            np.testing.assert_allclose(getattr(img, field), getattr(acq, field), atol=1e-4, err_msg=field)
        assert img.data_type == 1  # unsigned 16-bit
        assert int(np.asarray(img.data).max()) == 2**12 - 1

    store = JobStore(redis.Redis.from_url(e2e_settings.redis_url, decode_responses=True))
    job = store.get(job_id)
    assert job is not None and job.state is JobState.DONE and job.progress == 1.0
    assert job.started_at and job.finished_at and job.attempts == 1


def test_retrieval_with_no_matching_job_says_why(gateway) -> None:
    host, port = gateway
    header = client.retrieval_header("NOBODY", "1.2.3.4", "never_scanned")
    back = client.retrieve(host, port, header)
    assert back.closed and not back.images
    assert back.texts and back.texts[0].startswith("WRN") and "no reconstruction found" in back.texts[0]


def test_failed_job_is_reported_to_the_retrieval_scan(gateway, worker) -> None:
    """A scan whose header the pipeline cannot use fails with a reason, which the retrieval scan shows."""
    host, port = gateway
    scan = synthetic_scan(matrix=(32, 32), ncoil=2, protocol="e2e_broken", patient_id="BROKEN")
    scan.header.encoding[0].trajectory = type(scan.header.encoding[0].trajectory)("radial")
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian")
    assert reply.job_id(), reply.texts
    back = client.retrieve(host, port, scan.header)
    assert back.closed and not back.images
    assert back.texts[-1].startswith("ERR") and "failed" in back.texts[-1], back.texts
