"""RawScan and the header-only read against files written by ismrmrd.Dataset."""

import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import pytest

from reconq.core.mrdfile import MrdFileError, read_header
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
        start, heads, data, traj = raw.read(3, 7)
    assert start == 3 and len(heads) == len(data) == len(traj) == 4
    for i, (head, ksp, t) in enumerate(zip(heads, data, traj, strict=True)):
        acq = scan.acquisitions[3 + i]
        assert ksp.dtype == np.complex64 and ksp.shape == (3, 24)
        np.testing.assert_array_equal(ksp, acq.data)
        assert t is None  # a Cartesian readout has no trajectory
        assert int(head["scan_counter"]) == acq.scan_counter
        assert int(head["idx"]["kspace_encode_step_1"]) == acq.idx.kspace_encode_step_1


def test_iter_chunks_covers_the_scan_once(scan_file):
    scan, path = scan_file
    with RawScan.open(path) as raw:
        chunks = list(raw.iter_chunks(chunk=5))
    assert [c.start for c in chunks] == list(range(0, len(scan.acquisitions), 5))
    counters = np.concatenate([c.heads["scan_counter"] for c in chunks])
    np.testing.assert_array_equal(counters, [a.scan_counter for a in scan.acquisitions])
    assert sum(len(c.data) for c in chunks) == sum(len(c.traj) for c in chunks) == len(scan.acquisitions)


def test_a_chunk_carries_the_trajectory_of_readouts_that_have_one(tmp_path):
    """Radial-style readouts (kx, ky per sample) among Cartesian ones: each chunk hands both on, in order."""
    scan = synthetic_scan(matrix=(16, 12), ncoil=2, noise_readouts=1)
    acqs = scan.acquisitions
    with_traj = {2: 2, 5: 2, 6: 3}  # readout -> trajectory dimensions
    for i, tdim in with_traj.items():
        ns = acqs[i].number_of_samples
        traj = (np.arange(ns * tdim, dtype=np.float32).reshape(ns, tdim) - ns) / ns + i
        acqs[i].resize(ns, acqs[i].active_channels, tdim)
        acqs[i].traj[:] = traj
    path = write_mrd(scan, tmp_path / "raw.h5")
    with RawScan.open(path) as raw:
        chunks = list(raw.iter_chunks(chunk=4))
    traj = [t for c in chunks for t in c.traj]
    data = [d for c in chunks for d in c.data]
    assert len(traj) == len(acqs)
    for i, (acq, t, d) in enumerate(zip(acqs, traj, data, strict=True)):
        np.testing.assert_array_equal(d, acq.data)
        if i in with_traj:
            assert t is not None and t.dtype == np.float32 and t.shape == (acq.number_of_samples, with_traj[i])
            np.testing.assert_array_equal(t, acq.traj)
        else:
            assert t is None


def test_the_header_only_read_equals_the_full_read(scan_file):
    scan, path = scan_file
    with RawScan.open(path) as raw:
        full = raw.header
    header = read_header(path)
    assert header == full and xsd.ToXML(header) == xsd.ToXML(full) == xsd.ToXML(scan.header)


def test_the_header_only_read_names_what_is_wrong(tmp_path):
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["other"] = 1
    with pytest.raises(MrdFileError, match="no /dataset/xml"):
        read_header(tmp_path / "other.h5")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("dataset/xml", data=[b"<ismrmrdHeader><oops"], dtype=h5py.string_dtype())
    with pytest.raises(MrdFileError, match="cannot be parsed"):
        read_header(tmp_path / "bad.h5")
    with pytest.raises(ReconError, match="invalid MRD header"):
        RawScan.open(tmp_path / "bad.h5")


def test_open_closes_the_file(scan_file):
    _, path = scan_file
    raw = RawScan.open(path)
    with raw:
        assert not raw.closed
    assert raw.closed


def test_open_rejects_a_non_mrd_file(tmp_path):
    path = tmp_path / "not.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(ReconError, match="cannot open"):
        RawScan.open(path)


def test_a_file_without_readouts_opens_with_none(tmp_path):
    import h5py

    scan = synthetic_scan(matrix=(16, 12), ncoil=2)
    with h5py.File(tmp_path / "empty.h5", "w") as f:  # as the gateway leaves a session that sent no readout
        f.create_dataset("dataset/xml", data=[xsd.ToXML(scan.header).encode()], dtype=h5py.string_dtype())
    with RawScan.open(tmp_path / "empty.h5") as raw:
        assert len(raw) == 0 and list(raw.iter_chunks()) == []
        assert raw.header == scan.header
