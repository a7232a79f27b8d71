"""The pipeline registry and the headers the cartesian pipeline refuses."""

import ismrmrd.xsd as xsd
import pytest

from reconq.recon.errors import ReconError, UnknownPipelineError
from reconq.recon.rawdata import RawScan
from reconq.recon.registry import get_pipeline, pipeline_names
from reconq.recon.simulate import synthetic_scan, write_mrd


def test_cartesian_is_registered():
    assert "cartesian" in pipeline_names()
    assert get_pipeline("cartesian").name == "cartesian"


def test_unknown_pipeline_names_the_known_ones():
    with pytest.raises(UnknownPipelineError, match="cartesian") as info:
        get_pipeline("no_such_recon")
    assert "no_such_recon" in str(info.value)
    assert isinstance(info.value, ReconError)


def run_with_header_change(tmp_path, change):
    scan = synthetic_scan(matrix=(8, 8), ncoil=2)
    change(scan.header)
    with RawScan.open(write_mrd(scan, tmp_path / "raw.h5")) as raw:
        get_pipeline("cartesian").run(raw, {}, lambda fraction, stage: None)


def test_header_without_encoding_is_refused(tmp_path):
    with pytest.raises(ReconError, match="no encoding"):
        run_with_header_change(tmp_path, lambda header: setattr(header, "encoding", []))


def test_non_cartesian_trajectory_is_refused(tmp_path):
    def radial(header):
        header.encoding[0].trajectory = xsd.trajectoryType.RADIAL

    with pytest.raises(ReconError, match="radial"):
        run_with_header_change(tmp_path, radial)


def test_scan_with_only_noise_readouts_is_refused(tmp_path):
    scan = synthetic_scan(matrix=(8, 8), ncoil=2, noise_readouts=3)
    scan.acquisitions = scan.acquisitions[:3]
    with RawScan.open(write_mrd(scan, tmp_path / "raw.h5")) as raw, \
            pytest.raises(ReconError, match="no imaging readouts"):
        get_pipeline("cartesian").run(raw, {}, lambda fraction, stage: None)
