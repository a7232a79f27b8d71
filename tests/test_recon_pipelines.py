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


def _broken(acq, case: str):
    """The readout ``acq`` made into one case of data no recon can be right from."""
    import ismrmrd
    import numpy as np

    if case == "no samples":
        head = acq.getHead()
        head.number_of_samples = 0
        return ismrmrd.Acquisition(head)
    if case == "channels":
        fewer = ismrmrd.Acquisition.from_array(np.ascontiguousarray(acq.data[:1]))
        head = acq.getHead()
        head.active_channels, head.available_channels = 1, 1
        fewer.setHead(head)
        return fewer
    acq.data[0, 3] = np.nan if case == "nan" else np.inf
    return acq


@pytest.mark.parametrize("pipeline", ["cartesian", "sense"])
@pytest.mark.parametrize(("case", "message"), [
    ("no samples", "readout 10 has no samples"),
    ("nan", "readout 10 holds samples that are not finite"),
    ("inf", "readout 10 holds samples that are not finite"),
    ("channels", "readout 10 has 1 channels, the header's receiverChannels 4"),
])
def test_inconsistent_readouts_fail_naming_the_readout(tmp_path, pipeline, case, message):
    scan = synthetic_scan(matrix=(48, 48), ncoil=4, acceleration=(2, 1) if pipeline == "sense" else (1, 1))
    scan.acquisitions[10] = _broken(scan.acquisitions[10], case)
    path = write_mrd(scan, tmp_path / "bad.h5")
    with RawScan.open(path) as raw, pytest.raises(ReconError, match=message):
        get_pipeline(pipeline).run(raw, {}, lambda f, s: None)


def test_readouts_without_signal_never_make_a_done_recon(tmp_path):
    scan = synthetic_scan(matrix=(32, 32), ncoil=2)
    for acq in scan.acquisitions:
        acq.data[:] = 0
    path = write_mrd(scan, tmp_path / "blank.h5")
    with RawScan.open(path) as raw, pytest.raises(ReconError, match="every pixel of the images is 0"):
        get_pipeline("cartesian").run(raw, {}, lambda f, s: None)
