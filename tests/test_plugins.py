"""Offline recon code inline: plugins registered from a folder run end to end and come back on retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import ismrmrd.xsd as xsd
import numpy as np
import pytest

from reconq.core.celeryapp import make_celery
from reconq.core.jobs import Job, JobStore
from reconq.core.sender import TaskSender
from reconq.core.settings import Settings, load_settings
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.demo import expected_magnitude, nrmse
from reconq.gateway import client
from reconq.recon.plugins import PluginError, load_plugins
from reconq.recon.rawdata import RawScan
from reconq.recon.registry import get_pipeline
from reconq.recon.simulate import synthetic_scan, write_mrd
from reconq.scheduler.estimate import GB
from reconq.scheduler.placement import Placement

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "plugins"
#: The example plugin with its filter off is a plain FFT + sum of squares: only uint16 rounding remains.
NRMSE_BOUND = 0.01


@pytest.fixture(scope="module")
def e2e_settings(redis_server, tmp_path_factory) -> Settings:
    """The shared e2e settings, with the example plugin folder (overrides conftest's fixture here)."""
    return load_settings(data_dir=tmp_path_factory.mktemp("plugins") / "data", redis_url=redis_server.url,
                         mrd_port=0, min_free_bytes=0, retrieve_wait_s=60.0, retrieve_poll_s=0.2,
                         plugin_dir=EXAMPLES)


def test_example_plugin_reconstructs_with_scanner_geometry(tmp_path):
    assert load_plugins(EXAMPLES) == ["hann_fft"]
    scan = synthetic_scan(matrix=(48, 40), ncoil=4, nslices=3, position=(0.0, 5.0, -12.0))
    raw = write_mrd(scan, tmp_path / "raw.h5")
    seen: list[str] = []
    with RawScan.open(raw) as rs:
        images = get_pipeline("hann_fft").run(rs, {"filter_strength": 0.0}, lambda f, s: seen.append(s))
    assert "filter and FFT" in seen  # the plugin's own progress reaches the job
    got = np.stack([np.asarray(i.data)[0, 0].astype(np.float32) for i in images])
    assert nrmse(got, expected_magnitude(scan.truth, scan.mps)) < NRMSE_BOUND
    centre = scan.header.encoding[0].encodingLimits.kspace_encoding_step_1.center
    for img in images:
        acq = next(a for a in scan.acquisitions
                   if a.idx.slice == img.slice and a.idx.kspace_encode_step_1 == centre)
        np.testing.assert_allclose(img.position, acq.position, atol=1e-5)
        assert img.meta["SequenceDescriptionAdditional"] == "hann_fft"


def test_plugin_may_not_shadow_a_builtin(tmp_path):
    (tmp_path / "cartesian.py").write_text("def recon(twix, params, progress):\n    return None\n")
    with pytest.raises(PluginError, match="would replace an existing pipeline"):
        load_plugins(tmp_path)


def test_broken_plugins_are_named(tmp_path):
    (tmp_path / "norecon.py").write_text("x = 1\n")
    with pytest.raises(PluginError, match="norecon.py defines no function recon"):
        load_plugins(tmp_path)
    (tmp_path / "norecon.py").unlink()
    (tmp_path / "syntax.py").write_text("def recon(:\n")
    with pytest.raises(PluginError, match="syntax.py failed to import"):
        load_plugins(tmp_path)
    with pytest.raises(PluginError, match="does not exist"):
        load_plugins(tmp_path / "missing")


#: A plugin that declares its own estimates and needs a GPU; each hook call is written to calls.jsonl beside it.
ESTIMATED_PLUGIN = '''
import json
from pathlib import Path

import ismrmrd.xsd

PIPELINE_NAME = "estimated_by_its_plugin"
CPU_CAPABLE = False
CALLS = Path(__file__).with_name("calls.jsonl")


def _called(hook, header, params):
    with CALLS.open("a") as f:
        f.write(json.dumps({"hook": hook, "header": ismrmrd.xsd.ToXML(header), "params": params}) + "\\n")


def memory_estimate(header, params):
    _called("memory", header, params)
    coils = header.acquisitionSystemInformation.receiverChannels
    return int(params["gb_per_coil"] * coils * 1e9)


def runtime_estimate(header, params):
    _called("runtime", header, params)
    return 42.0


def recon(twix, params, progress):
    return twix.image[:, 0, :, 0, 0, 0, 0, 0, 0, 0, 0].T
'''


def test_a_plugin_outside_recon_is_estimated_at_submit_by_its_own_hooks(tmp_path: Path, settings: Settings,
                                                                        store: JobStore) -> None:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "estimated.py").write_text(ESTIMATED_PLUGIN)
    assert load_plugins(folder) == ["estimated_by_its_plugin"]
    assert get_pipeline("estimated_by_its_plugin").cpu_capable is False  # CPU_CAPABLE = False
    scans = ScanStore(settings.data_dir)
    scan = synthetic_scan(matrix=(32, 32), ncoil=4)
    raw = scans.raw_path("est-scan")
    raw.parent.mkdir(parents=True)
    write_mrd(scan, raw)
    params = {"gb_per_coil": 1.5}
    job = Job(id="est-1", scan_id="est-scan", pipeline="estimated_by_its_plugin", queue="routine",
              protocol="est", params=params)
    assert store.create(job) and store.set_state(job.id, JobState.QUEUED)
    placement = Placement(settings, store, scans, TaskSender(make_celery(settings)))
    left = placement.place_many([job])  # the header is read from the stored raw file (/dataset/xml only)
    assert [j.id for j in left] == ["est-1"]  # no GPU has live workers: to its queue, its estimates kept
    kept = store.get("est-1")
    assert kept is not None
    assert kept.mem_estimate_bytes == 6 * GB  # 1.5 GB x 4 coils, from the plugin's hook
    assert kept.runtime_estimate_s == 42.0
    calls = [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]
    assert [c["hook"] for c in calls] == ["memory", "runtime"]
    assert all(c["header"] == xsd.ToXML(scan.header) and c["params"] == params for c in calls)
    with pytest.raises(PluginError, match="memory_estimate failed: KeyError"):  # a failing hook is named
        get_pipeline("estimated_by_its_plugin").memory_estimate(scan.header, {})
    with pytest.raises(PluginError, match="CPU_CAPABLE must be True or False"):
        (folder / "estimated.py").write_text(ESTIMATED_PLUGIN.replace("CPU_CAPABLE = False", "CPU_CAPABLE = 'no'"))
        load_plugins(folder)


def test_plugin_end_to_end_through_gateway_queue_worker_and_retrieval(gateway, worker):
    host, port = gateway
    scan = synthetic_scan(matrix=(64, 64), ncoil=4, nslices=2, protocol="plugin_t2", patient_id="PLUG1")
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="hann_fft",
                             params={"filter_strength": 0.0})
    assert reply.job_id() and not reply.errors(), reply.texts
    back = client.retrieve(host, port, scan.header)
    assert len(back.images) == 2, back.texts
    got = np.stack([np.asarray(i.data)[0, 0].astype(np.float32) for i in back.images])
    assert nrmse(got, expected_magnitude(scan.truth, scan.mps)) < NRMSE_BOUND
