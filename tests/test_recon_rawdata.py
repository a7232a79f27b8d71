"""RawScan against files written by ismrmrd.Dataset."""

import ismrmrd
import numpy as np
import pytest

from reconq.recon.errors import ReconError
from reconq.recon.rawdata import RawScan
from reconq.recon.simulate import synthetic_scan, write_mrd


@pytest.fixture
def scan_file(tmp_path):
    scan = synthetic_scan(matrix=(16, 12), ncoil=3, nslices=2, noise=0.1, noise_readouts=1)
    return scan, write_mrd(scan, tmp_path / "raw.h5")


def test_rawscan_reads_what_ismrmrd_wrote(scan_file):
    scan, path = scan_file
    with RawScan.open(path) as raw:
        assert len(raw) == len(scan.acquisitions)
        assert raw.heads.dtype == ismrmrd.hdf5.acquisition_header_dtype
        assert raw.header.subjectInformation.patientID == "PAT001"
        assert "<ismrmrdHeader" in raw.xml
        heads, data, traj = raw.read(3, 7)
    assert len(heads) == len(data) == len(traj) == 4
    for i, (head, ksp, t) in enumerate(zip(heads, data, traj, strict=True)):
        acq = scan.acquisitions[3 + i]
        assert ksp.dtype == np.complex64 and ksp.shape == (3, 24)
        np.testing.assert_array_equal(ksp, acq.data)
        assert t.dtype == np.float32 and t.shape == (24, 0)
        assert int(head["scan_counter"]) == acq.scan_counter
        assert int(head["idx"]["kspace_encode_step_1"]) == acq.idx.kspace_encode_step_1


def test_iter_chunks_covers_the_scan_once(scan_file):
    scan, path = scan_file
    with RawScan.open(path) as raw:
        chunks = list(raw.iter_chunks(chunk=5))
    assert [start for start, _, _ in chunks] == list(range(0, len(scan.acquisitions), 5))
    counters = np.concatenate([heads["scan_counter"] for _, heads, _ in chunks])
    np.testing.assert_array_equal(counters, [a.scan_counter for a in scan.acquisitions])
    assert sum(len(data) for _, _, data in chunks) == len(scan.acquisitions)


def test_open_closes_the_file(scan_file):
    _, path = scan_file
    raw = RawScan.open(path)
    with raw:
        pass
    assert not raw._file  # h5py File is falsy once closed


def test_open_rejects_a_non_mrd_file(tmp_path):
    path = tmp_path / "not.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(ReconError, match="cannot open"):
        RawScan.open(path)
