"""One data root, checked, on two "nodes" in one test: real worker processes, a real redis-server.

A node whose data dir is not the gateway's refuses to start and says why; a node that mounts the shared root
at another path reconstructs, and the images come back over MRD and HTTP; reference scans are found through
the scan index in Redis, and one the index knows but this node's disk lacks is reported as storage not shared.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import ROOT, stop_process
from fastapi.testclient import TestClient

from reconq import faultkit
from reconq.api.auth import hash_token
from reconq.core.constants import DATA_ROOT_KEY, SCAN_INDEX
from reconq.core.dataroot import (
    ROOT_FILE,
    DataRootError,
    DataRootMismatch,
    DataRootUnchecked,
    DataRootUnrecorded,
    check_data_root,
    read_root_id,
)
from reconq.core.jobs import Job, JobStore
from reconq.core.redisconn import PrivateRedis, free_port
from reconq.core.results import read_images
from reconq.core.settings import Settings, load_settings
from reconq.core.states import JobState
from reconq.core.storage import ScanRecord, ScanState, ScanStore
from reconq.gateway import client as mrd
from reconq.recon.simulate import synthetic_scan
from reconq.scheduler import scanindex
from reconq.services import make_api, make_gateway
from reconq.stack import child_env
from reconq.workers.inputs import InputsMissing, InputsNotReady, resolve_inputs

TOKEN = "dataroot-token-0123456789abcdef"
MOUNT_ADVICE = "Mount the shared data root at RECONQ_DATA_DIR on every node"


@pytest.fixture
def url(redis_server: PrivateRedis) -> str:
    """A Redis db of this module's own (8), flushed before each test."""
    url = redis_server.url.rsplit("/", 1)[0] + "/8"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def node(url: str, data_dir: Path, **changes: object) -> Settings:
    """One node's settings: the shared Redis, its own RECONQ_DATA_DIR."""
    return load_settings(data_dir=data_dir, redis_url=url, mrd_port=0, min_free_bytes=0, retrieve_wait_s=90.0,
                         retrieve_poll_s=0.2, **changes)


# -- check_data_root's cases ----------------------------------------------------------------------------------

def test_a_fresh_root_gets_an_id_file_and_redis_records_it(url, client, tmp_path):
    settings = node(url, tmp_path / "root")
    ident = check_data_root(settings, client, create=True, role="gateway")
    path = tmp_path / "root" / ROOT_FILE
    body = json.loads(path.read_text())
    assert body["id"] == ident and client.get(DATA_ROOT_KEY) == ident
    assert set(body) == {"id", "created_at", "about"} and abs(body["created_at"] - time.time()) < 60
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == [ROOT_FILE]  # no temporary file left


def test_a_restart_finds_the_same_root(url, client, tmp_path):
    settings = node(url, tmp_path / "root")
    ident = check_data_root(settings, client, create=True)
    assert check_data_root(settings, client, create=True) == ident  # the gateway again
    assert check_data_root(settings, client, create=False, role="worker") == ident
    assert read_root_id(tmp_path / "root") == ident


def test_redis_lost_its_data_the_gateway_records_the_root_again_a_worker_waits(url, client, tmp_path):
    settings = node(url, tmp_path / "root")
    ident = check_data_root(settings, client, create=True)
    client.flushdb()  # Redis lost its data; the data root did not
    with pytest.raises(DataRootUnrecorded, match=f"has id {ident}.*start the gateway"):
        check_data_root(settings, client, create=False, role="worker")
    # a worker that waits is let in once the gateway has recorded the root again
    threading.Timer(0.5, check_data_root, (settings, client, True)).start()
    assert check_data_root(settings, client, create=False, role="worker", wait_s=20, poll_s=0.1) == ident
    assert client.get(DATA_ROOT_KEY) == ident


def test_a_worker_that_waited_for_the_gateway_allows_its_file_to_show_late(url, client, tmp_path):
    """Services started together: the worker waits for the id; the gateway's file may appear on the worker's
    node after Redis has the id (an NFS client's cached "no such file"), which is waited for too."""
    settings = node(url, tmp_path / "root")
    ident = "feedc0de" * 4

    def gateway_starts() -> None:
        client.set(DATA_ROOT_KEY, ident)
        time.sleep(0.5)
        (tmp_path / "root").mkdir()
        (tmp_path / "root" / ROOT_FILE).write_text(json.dumps({"id": ident, "created_at": time.time()}))

    threading.Timer(0.3, gateway_starts).start()
    assert check_data_root(settings, client, create=False, role="worker", wait_s=20, poll_s=0.1) == ident


def test_no_id_anywhere_only_the_gateway_creates_one(url, client, tmp_path):
    settings = node(url, tmp_path / "root")
    t0 = time.monotonic()
    with pytest.raises(DataRootUnrecorded, match=r"no gateway has started.*\(waited 0.3 s\)"):
        check_data_root(settings, client, create=False, role="worker", wait_s=0.3, poll_s=0.1)
    assert time.monotonic() - t0 >= 0.3
    assert not (tmp_path / "root" / ROOT_FILE).exists() and client.get(DATA_ROOT_KEY) is None


def test_a_wrong_root_is_refused_saying_what_each_side_has(url, client, tmp_path):
    shared = check_data_root(node(url, tmp_path / "shared"), client, create=True)
    empty = node(url, tmp_path / "mnt")  # the share not mounted: an empty mount point
    (tmp_path / "mnt").mkdir()
    for create in (False, True):  # a gateway on it is refused too, and writes no id file there
        with pytest.raises(DataRootMismatch) as refused:
            check_data_root(empty, client, create=create, role="worker")
        text = str(refused.value)
        assert f"Redis records data root id {shared}" in text and f"has no {ROOT_FILE}" in text
        assert str((tmp_path / "mnt").absolute()) in text and MOUNT_ADVICE in text
        assert not (tmp_path / "mnt" / ROOT_FILE).exists()
    # another data root, with an id of its own (a node's old local folder)
    client.delete(DATA_ROOT_KEY)
    other = check_data_root(node(url, tmp_path / "other"), client, create=True)
    client.set(DATA_ROOT_KEY, shared)
    with pytest.raises(DataRootMismatch, match=f"is data root id {other}.*Redis records data root id {shared}"):
        check_data_root(node(url, tmp_path / "other"), client, create=False, role="worker")


def test_two_first_starts_race_to_one_id(url, tmp_path):
    """Eight creators at once on one empty root: one id file, the same id everywhere. Then two gateways on
    two empty roots at once: one is recorded, the other refused."""
    def race(dirs: list[Path]) -> list[str | BaseException]:
        barrier = threading.Barrier(len(dirs))
        out: list[str | BaseException] = [""] * len(dirs)

        def one(i: int) -> None:
            barrier.wait()
            try:
                out[i] = check_data_root(node(url, dirs[i]), redis.Redis.from_url(url, decode_responses=True), True)
            except BaseException as e:  # noqa: BLE001 - collected for the asserts
                out[i] = e
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(dirs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return out

    same = race([tmp_path / "one"] * 8)
    recorded = redis.Redis.from_url(url, decode_responses=True).get(DATA_ROOT_KEY)
    assert same == [recorded] * 8 and read_root_id(tmp_path / "one") == recorded
    redis.Redis.from_url(url).flushdb()
    two = race([tmp_path / "a", tmp_path / "b"])
    assert sum(isinstance(r, str) for r in two) == 1 and sum(isinstance(r, DataRootMismatch) for r in two) == 1, two


def test_an_unreadable_id_file_is_refused_not_guessed(url, client, tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / ROOT_FILE).write_text("not json")
    with pytest.raises(DataRootError, match="is not a ReconQ data root id file"):
        check_data_root(node(url, tmp_path / "root"), client, create=True)


def test_redis_unreachable_the_api_and_the_gateway_start_unchecked(tmp_path):
    """Both serve without Redis (the gateway stores scans and queues them later); the gateway checks the
    data root once Redis answers (tests/test_gateway_redis_down.py shows it stopping on another root's id)."""
    down = node(f"redis://127.0.0.1:{free_port()}/0", tmp_path / "root",
                staff_tokens={"robot": hash_token(TOKEN)})
    with pytest.raises(DataRootUnchecked, match="Redis .* is unreachable"):
        check_data_root(down, redis.Redis.from_url(down.redis_url or "", decode_responses=True), create=False)
    assert make_api(down) is not None
    gateway = make_gateway(down)
    assert gateway.fatal is None


def test_the_gateway_and_the_api_refuse_a_wrong_root(url, client, tmp_path):
    check_data_root(node(url, tmp_path / "shared"), client, create=True)
    with pytest.raises(DataRootMismatch, match=MOUNT_ADVICE):
        make_gateway(node(url, tmp_path / "elsewhere"))
    with pytest.raises(DataRootMismatch, match="start this API again"):
        make_api(node(url, tmp_path / "elsewhere", staff_tokens={"robot": hash_token(TOKEN)}))
    run = subprocess.run([sys.executable, "-m", "reconq.cli", "gateway"], env=env_of(node(url, tmp_path / "elsewhere")),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and "has no reconq-root.json" in run.stderr, run.stderr


# -- two nodes, real worker processes -------------------------------------------------------------------------

def env_of(settings: Settings) -> dict[str, str]:
    return child_env(settings)


@pytest.mark.parametrize("args", [["worker", "--concurrency", "1"], ["worker", "--cpu", "1"]],
                         ids=["worker", "launcher"])
def test_a_worker_whose_data_root_is_not_the_gateways_refuses_to_start(url, client, tmp_path, args):
    """Node 1 runs the gateway on the shared root; node 2's RECONQ_DATA_DIR is an empty folder (the share not
    mounted), then an old local root of its own: its worker exits non-zero at once, saying why."""
    gateway = make_gateway(node(url, tmp_path / "node1" / "data"))
    gateway.start()
    try:
        shared = client.get(DATA_ROOT_KEY)
        assert shared == read_root_id(tmp_path / "node1" / "data")
        not_mounted = tmp_path / "node2" / "data"
        not_mounted.mkdir(parents=True)
        run = subprocess.run([sys.executable, "-m", "reconq.cli", *args], env=env_of(node(url, not_mounted)),
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert run.returncode == 2, run.stdout + run.stderr
        assert f"the data dir {not_mounted} is not the shared data root: it has no {ROOT_FILE}" in run.stderr
        assert f"Redis records data root id {shared}" in run.stderr and MOUNT_ADVICE in run.stderr
        assert "ready." not in run.stdout + run.stderr and not (not_mounted / ROOT_FILE).exists()

        local = tmp_path / "node2" / "old-local"
        local.mkdir()
        (local / ROOT_FILE).write_text(json.dumps({"id": "0123abcd", "created_at": 0}))
        run = subprocess.run([sys.executable, "-m", "reconq.cli", *args], env=env_of(node(url, local)),
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert run.returncode == 2, run.stdout + run.stderr
        assert f"is data root id 0123abcd ({ROOT_FILE}), but Redis records data root id {shared}" in run.stderr
    finally:
        gateway.stop()


def mount_elsewhere(shared: Path, mount_point: Path) -> list[str]:
    """A command prefix that runs a program with ``shared`` mounted at ``mount_point``, as another node
    mounting the share at its own path: a bind mount in a private mount namespace (root), else a symlink."""
    mount_point.mkdir(parents=True)
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind '{shared}' '{mount_point}'"],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is not None and probe.returncode == 0:
        return ["unshare", "-m", "sh", "-c", f'mount --bind "{shared}" "{mount_point}" && exec "$@"', "sh"]
    mount_point.rmdir()
    mount_point.symlink_to(shared, target_is_directory=True)
    return []


def spawn_worker(settings: Settings, prefix: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    return faultkit.spawn_worker(settings, log_path, prefix=prefix)


def test_a_worker_with_the_shared_root_at_another_path_reconstructs_and_the_images_come_back(url, client, tmp_path):
    shared = tmp_path / "node1" / "data"
    gateway_settings = node(url, shared, staff_tokens={"robot": hash_token(TOKEN)})
    gateway = make_gateway(gateway_settings)
    host, port = gateway.start()
    elsewhere = tmp_path / "node2" / "mnt" / "reconq"
    prefix = mount_elsewhere(shared, elsewhere)
    worker = spawn_worker(node(url, elsewhere), prefix, tmp_path / "worker.log")
    try:
        scan = synthetic_scan(matrix=(32, 32), ncoil=2, nslices=2, protocol="two_nodes", patient_id="NODES")
        reply = mrd.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian")
        job_id = reply.job_id()
        assert job_id and not reply.errors(), reply.texts

        back = mrd.retrieve(host, port, scan.header)  # waits for the job
        assert back.closed and len(back.images) == 2, back.texts
        job = JobStore(client).get(job_id)
        assert job is not None and job.state is JobState.DONE, job
        assert job.result_path.startswith(f"scans/{job.scan_id}/results/{job_id}")  # relative: found on every node
        assert (shared / job.result_path).is_file()

        api = TestClient(make_api(gateway_settings, client))
        got = api.get(f"/api/jobs/{job_id}/images", headers={"Authorization": f"Bearer {TOKEN}"})
        assert got.status_code == 200, got.text
        (tmp_path / "got.h5").write_bytes(got.content)
        assert len(read_images(tmp_path / "got.h5")) == 2
    finally:
        stop_process(worker)
        gateway.stop()
    if prefix:  # the bind mount lived in the worker's namespace only: here the mount point is still empty
        assert list(elsewhere.iterdir()) == []


# -- reference scans through the index ------------------------------------------------------------------------

def complete_scan(scans: ScanStore, scan_id: str, protocol: str, completed_at: float, patient: str = "P1",
                  study: str = "S1", state: ScanState = ScanState.COMPLETE) -> ScanRecord:
    record = ScanRecord(scan_id=scan_id, state=state, protocol=protocol, patient_id=patient, study_uid=study,
                        created_at=completed_at - 10, completed_at=completed_at)
    scans.create(record)
    return record


def target(**params: object) -> Job:
    return Job(id="target-j1", scan_id="target", pipeline="sense", params=dict(params), patient_id="P1",
               study_uid="S1")


def test_a_reference_in_redis_but_not_on_this_nodes_disk_says_storage_is_not_shared(client, tmp_path):
    gateway_side = ScanStore(tmp_path / "node1")
    this_node = ScanStore(tmp_path / "node2")
    record = complete_scan(gateway_side, "20260101T080000-ref", "AdjCoilSens", completed_at=time.time() - 3600)
    assert scanindex.record_scan(client, record)
    for params in ({"reference_protocol": "AdjCoilSens"}, {"reference_scan": "20260101T080000-ref"}):
        with pytest.raises(InputsMissing) as missing:
            resolve_inputs(target(**params), this_node, client)
        text = str(missing.value)
        assert "storage is not shared" in text and "not mounted here" in text, text
        assert str(this_node.root.parent) in text and "does not exist" not in text
    # without Redis, this node can only say what it sees
    with pytest.raises(InputsMissing, match="does not exist"):
        resolve_inputs(target(reference_scan="20260101T080000-ref"), this_node)

    # one that completed a moment ago may not be visible yet on a shared file system: waited for, saying so
    fresh = complete_scan(gateway_side, "20260101T090000-new", "AdjCoilSens", completed_at=time.time())
    scanindex.record_scan(client, fresh)
    with pytest.raises(InputsNotReady, match="not yet under this node's data root"):
        resolve_inputs(target(reference_protocol="AdjCoilSens"), this_node, client)


def test_lookups_use_the_index_newest_of_several_and_no_disk_walk(client, tmp_path, monkeypatch):
    scans = ScanStore(tmp_path / "root")
    now = time.time()
    for i, when in enumerate((now - 300, now - 100, now - 200)):
        scanindex.record_scan(client, complete_scan(scans, f"20260101T08000{i}-c{i}", "AdjCoilSens", when))
    scanindex.record_scan(client, complete_scan(scans, "20260101T090000-p2", "AdjCoilSens", now, patient="P2"))
    scanindex.record_scan(client, complete_scan(scans, "20260101T090001-t2", "T2", now))
    cut = complete_scan(scans, "20260101T090002-cut", "AdjCoilSens", now, state=ScanState.INCOMPLETE)
    assert not scanindex.record_scan(client, cut)  # only complete scans are indexed

    def no_walk(*_: object, **__: object) -> None:
        raise AssertionError("walked the disk although the index knows the scan")

    monkeypatch.setattr(scans, "scans", no_walk)
    params = resolve_inputs(target(reference_protocol="AdjCoilSens"), scans, client)
    assert params["reference"] == str(scans.raw_path("20260101T080001-c1"))  # completed last
    assert scanindex.newest(client, "P1", "S1", "AdjCoilSens", exclude="20260101T080001-c1").scan_id \
        == "20260101T080002-c2"
    # no identifier in clear in any key, nor in the index's values
    dump = " ".join(client.keys("*")) + " ".join(client.hvals("reconq:scansindexed"))
    assert "P1" not in dump and "S1" not in dump and "AdjCoilSens" not in dump


def test_without_an_index_entry_the_disk_is_walked(client, tmp_path):
    """Redis lost the index (or a scan completed while it was away): the disk finds it; Redis down too."""
    scans = ScanStore(tmp_path / "root")
    complete_scan(scans, "20260101T080000-ref", "AdjCoilSens", time.time())
    assert resolve_inputs(target(reference_protocol="AdjCoilSens"), scans, client)["reference"] \
        == str(scans.raw_path("20260101T080000-ref"))
    down = redis.Redis(port=free_port(), decode_responses=True)
    assert resolve_inputs(target(reference_protocol="AdjCoilSens"), scans, down)["reference"] \
        == str(scans.raw_path("20260101T080000-ref"))


def test_the_index_is_rebuilt_from_disk(client, tmp_path):
    scans = ScanStore(tmp_path / "root")
    now = time.time()
    complete_scan(scans, "20260101T080000-a", "AdjCoilSens", now - 50)
    complete_scan(scans, "20260101T080001-b", "AdjCoilSens", now - 10)
    complete_scan(scans, "20260101T080002-r", "AdjCoilSens", now, state=ScanState.RECEIVING)
    gone = ScanRecord(scan_id="20250101T000000-gone", state=ScanState.COMPLETE, protocol="AdjCoilSens",
                      patient_id="P1", study_uid="S1", completed_at=now + 100)
    scanindex.record_scan(client, gone)  # indexed, but its folder is not on the data root (removed)
    assert scanindex.rebuild(client, scans) == scanindex.Rebuilt(added=2, removed=1)
    assert scanindex.newest(client, "P1", "S1", "AdjCoilSens") == scanindex.Indexed("20260101T080001-b", now - 10)
    assert scanindex.indexed(client, "20250101T000000-gone") is None
    assert scanindex.rebuild(client, scans) == scanindex.Rebuilt(added=0, removed=0)  # nothing to do again
    client.flushdb()  # Redis lost everything: the disk gives it all back
    assert scanindex.rebuild(client, scans).added == 2
    assert len(list(client.scan_iter(SCAN_INDEX + "*"))) == 1
