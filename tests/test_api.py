"""The HTTP API on a real Redis: listing and filters, one job, downloads, sign-in, staff actions, status
routes, metrics and the OpenAPI description; refusals come with a clear message."""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from pathlib import Path

import ismrmrd
import numpy as np
import pydicom
import pytest
import redis
from conftest import claim_data_root
from fastapi.testclient import TestClient
from PIL import Image as PILImage

from reconq.api.auth import ACTION_HEADER, hash_password, hash_token, verify_secret
from reconq.api.problems import ACTION_ERROR_STATUS
from reconq.core.constants import (
    GPU_RESERVATION_OWNERS,
    GPU_RESERVATIONS,
    GPU_SEEN,
    GPU_STATE,
    JOB_KEY,
    QUEUE_ORDER,
    RUN_JOB_TASK,
    WORKER_HEARTBEAT,
    WORKERS_INDEX,
)
from reconq.core.jobs import Job
from reconq.core.results import read_images, write_images
from reconq.core.results import result_file as derived_result_file
from reconq.core.settings import SettingsError
from reconq.core.states import ACTIVE, CANCELLABLE, FINISHED, TRANSITIONS, JobState
from reconq.core.storage import ScanRecord, ScanState, ScanStore
from reconq.recon.simulate import synthetic_scan, write_mrd
from reconq.scheduler.actions import ActionError
from reconq.scheduler.admission import PENDING_SUFFIX, Admission, Verdict
from reconq.scheduler.estimate import GB
from reconq.scheduler.inventory import SimulatedInventory
from reconq.scheduler.routing import gpu_queue, waiting_score
from reconq.scheduler.submit import enqueue
from reconq.services import make_api
from reconq.workers.heartbeat import Heartbeat
from reconq.workers.slot import Slot

PASSWORD = "a long and proper password"
TOKEN = "test-token-0123456789abcdef"
PASSWORD_HASH = hash_password(PASSWORD)
STAFF = {"Authorization": f"Bearer {TOKEN}"}


def make_client(settings, **changes) -> TestClient:
    settings = settings.model_copy(update={"staff_passwords": {"alice": PASSWORD_HASH},
                                           "staff_tokens": {"robot": hash_token(TOKEN)}, **changes})
    return TestClient(make_api(settings, redis.Redis.from_url(settings.redis_url, decode_responses=True)))


@pytest.fixture
def api(settings) -> TestClient:
    """Viewing open to all (read-only), actions for staff."""
    return make_client(settings, dashboard_public_read=True)


@pytest.fixture
def closed_api(settings) -> TestClient:
    """Viewing only after sign-in (the default)."""
    return make_client(settings)


def result_file(path, nslices: int = 3):
    scan = synthetic_scan(matrix=(32, 32), ncoil=2, nslices=nslices, protocol="t1", patient_id="PAT12345")
    images = []
    for s in range(nslices):
        image = ismrmrd.Image.from_array((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) + s * 7) % 4096)
        image.image_index, image.image_series_index, image.slice = s + 1, 1, s
        image.field_of_view = (220.0, 220.0, 5.0)
        image.read_dir, image.phase_dir, image.slice_dir = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
        images.append(image)
    write_images(path, images, ismrmrd.xsd.ToXML(scan.header))
    return images


def stored_scan(settings, scan_id: str = "scan1", state: ScanState = ScanState.COMPLETE) -> ScanRecord:
    record = ScanRecord(scan_id=scan_id, state=state, pipeline="cartesian", params={"lambda": 0.1},
                        patient_id="PAT12345", study_uid="1.2.3", protocol="t1_retro")
    ScanStore(settings.data_dir).create(record)
    return record


def queue_ids(store, queue: str) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in store.redis.lrange(queue, 0, -1)]


def stored_result(settings, scan_id: str, job_id: str, run: int = 1):
    """The result file of run ``run`` of a job, where the worker writes it (derived from the ids), and its name
    in Redis (relative to the root: only information, never read to find the file)."""
    scans = ScanStore(settings.data_dir)
    path = derived_result_file(scans, Job(id=job_id, scan_id=scan_id, pipeline="cartesian", attempts=run))
    path.parent.mkdir(parents=True, exist_ok=True)
    return result_file(path), scans.stored(path)


def test_jobs_list_one_job_and_images(api, store, settings, tmp_path):
    for i in range(3):
        store.create(Job(id=f"j{i}", scan_id=f"s{i}", pipeline="cartesian", created_at=100.0 + i,
                         protocol="t1", patient_id="SECRET"))
    images, stored = stored_result(settings, "s1", "j1")
    store.set_state("j1", JobState.RUNNING, attempts=1)
    store.set_state("j1", JobState.DONE, result_path=stored, progress=1.0)

    page = api.get("/api/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and [j["id"] for j in page["jobs"]] == ["j2", "j1"]
    assert page["jobs"][0]["patient"].startswith("P-") and "patient_id" not in page["jobs"][0]  # masked
    assert api.get("/api/jobs", headers=STAFF).json()["jobs"][0]["patient"] == "SECRET"
    done = api.get("/api/jobs", params={"state": "done"}).json()
    assert [j["id"] for j in done["jobs"]] == ["j1"] and done["jobs"][0]["has_images"]

    one = api.get("/api/jobs/j1", headers=STAFF).json()  # the log and previews: staff only
    assert one["state"] == "done" and one["progress"] == 1.0 and one["finished_at"] is not None
    assert one["image_count"] == 3 and one["previews"] == [0, 1, 2] and "state done" in one["log"][-1]

    assert api.get("/api/jobs/j1/images").status_code == 401  # downloads carry the patient: staff only
    got = api.get("/api/jobs/j1/images", headers=STAFF)
    assert got.status_code == 200 and got.headers["content-type"] == "application/x-hdf5"
    downloaded = tmp_path / "d.h5"
    downloaded.write_bytes(got.content)
    assert np.array_equal(read_images(downloaded)[0].data, images[0].data)


def test_stage_timings_come_from_the_recorded_stages(api, store):
    store.create(Job(id="st1", scan_id="s", pipeline="cartesian"))
    store.set_state("st1", JobState.RUNNING, attempts=1, started_at=100.0)
    store.enter_stage("st1", "reading", at=100.0)
    store.enter_stage("st1", "fft", at=103.0)
    store.set_state("st1", JobState.DONE, finished_at=110.0, progress=1.0)
    one = api.get("/api/jobs/st1", headers=STAFF).json()
    # the log lines carry the wall-clock time of writing; the stages their own records
    assert one["stages"] == [{"stage": "reading", "started_at": 100.0, "seconds": 3.0},
                             {"stage": "fft", "started_at": 103.0, "seconds": 7.0}]


def test_previews_and_dicom(api, store, settings):
    images, stored = stored_result(settings, "s", "d1")
    store.create(Job(id="d1", scan_id="s", pipeline="cartesian", protocol="t1"))
    store.set_state("d1", JobState.RUNNING, attempts=1)
    store.set_state("d1", JobState.DONE, result_path=stored)

    assert api.get("/api/jobs/d1/previews/2.png").status_code == 401  # previews carry the patient: staff only
    png = api.get("/api/jobs/d1/previews/2.png", headers=STAFF)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert PILImage.open(io.BytesIO(png.content)).size == (32, 32)
    missing = api.get("/api/jobs/d1/previews/9.png", headers=STAFF)
    assert missing.status_code == 404 and "out of range (the result has 3)" in missing.json()["detail"]

    z = api.get("/api/jobs/d1/dicom", headers=STAFF)
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        names = sorted(zf.namelist())
        ds = pydicom.dcmread(io.BytesIO(zf.read(names[1])))
    assert len(names) == 3 and ds.Modality == "MR" and ds.PatientID == "PAT12345"
    assert np.array_equal(ds.pixel_array, np.asarray(images[1].data)[0, 0])
    assert [float(v) for v in ds.PixelSpacing] == [220 / 32, 220 / 32]
    # MRD gives the centre pixel's position (rows // 2, columns // 2); DICOM the first pixel's centre
    assert float(ds.ImagePositionPatient[0]) == pytest.approx(-(32 // 2) * 220 / 32)  # the centre pixel is 16


def test_filters_by_state_protocol_and_date(api, store):
    day = 86400.0
    t0 = time.mktime(time.strptime("2026-03-02", "%Y-%m-%d"))
    for i, (proto, state) in enumerate([("t1_mprage", JobState.DONE), ("T2_flair", JobState.FAILED),
                                        ("t1_vibe", JobState.DONE), ("dwi", JobState.QUEUED)]):
        store.create(Job(id=f"f{i}", scan_id=f"s{i}", pipeline="cartesian", protocol=proto,
                         created_at=t0 + i * day + 60, state=state))

    def ids(**params: str) -> list[str]:
        return [j["id"] for j in api.get("/api/jobs", params=params).json()["jobs"]]

    assert ids(protocol="T1") == ["f2", "f0"]
    assert ids(protocol="t1", state="done") == ["f2", "f0"]
    assert ids(state="failed") == ["f1"]
    assert ids(since="2026-03-03", until="2026-03-05") == ["f2", "f1"]
    assert ids(since="2026-03-03", protocol="t1") == ["f2"]
    page = api.get("/api/jobs", params={"protocol": "t", "limit": 1, "offset": 1}).json()
    assert page["total"] == 3 and [j["id"] for j in page["jobs"]] == ["f1"]


@pytest.mark.parametrize(("params", "message"), [
    ({"limit": 0}, "limit: Input should be greater than or equal to 1"),
    ({"limit": 501}, "limit: Input should be less than or equal to 500"),
    ({"offset": -1}, "offset: Input should be greater than or equal to 0"),
    ({"state": "bogus"}, "state: Input should be"),
    ({"since": "yesterday"}, "since: Input should be a valid datetime"),
    ({"since": "2026-03-05", "until": "2026-03-01"}, "`since` must be before `until`"),
])
def test_bad_parameters_get_a_clear_422(api, params, message):
    r = api.get("/api/jobs", params=params)
    assert r.status_code == 422 and message in r.json()["detail"], r.json()


def test_refusals_say_what_is_wrong(api, store):
    store.create(Job(id="q1", scan_id="s", pipeline="cartesian"))
    r = api.get("/api/jobs/nope")
    assert r.status_code == 404 and "no job 'nope'" in r.json()["detail"]
    r = api.get("/api/jobs/q1/images", headers=STAFF)
    assert r.status_code == 409 and "has no images (state queued)" in r.json()["detail"]
    assert api.get("/api/jobs/q1/dicom", headers=STAFF).status_code == 409
    assert api.get("/api/jobs/q1/previews/0.png", headers=STAFF).status_code == 409
    r = api.get("/api/jobs", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "bearer token is not valid" in r.json()["detail"]


def test_viewing_needs_sign_in_unless_settings_allow(closed_api, store):
    store.create(Job(id="v1", scan_id="s", pipeline="cartesian"))
    for path in ("/api/jobs", "/api/jobs/v1", "/api/queues", "/api/retrievals", "/api/pipelines", "/api/events",
                 "/api/vocabulary", "/api/gpus"):
        r = closed_api.get(path)
        assert r.status_code == 401 and "sign in to view jobs" in r.json()["detail"], path
    assert closed_api.get("/api/jobs", headers=STAFF).status_code == 200
    assert closed_api.get("/api/health").status_code == 200  # liveness stays open
    assert closed_api.get("/").status_code == 200  # the page itself, which then asks to sign in


def test_sign_in_by_password_or_token_and_out(closed_api, caplog):
    assert closed_api.get("/api/auth/me").json() == {"name": "", "staff": False, "role": None, "public_read": False}
    bad = closed_api.post("/api/auth/signin", json={"name": "alice", "password": "wrong"})
    assert bad.status_code == 401 and bad.json()["detail"] == "wrong name, password or token"
    r = closed_api.post("/api/auth/signin", json={"name": "alice"})
    assert r.status_code == 422 and "give a name and password, or a token" in r.json()["detail"]

    me = closed_api.post("/api/auth/signin", json={"name": "alice", "password": PASSWORD})
    assert me.status_code == 200 and me.json()["name"] == "alice"
    cookie = me.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert closed_api.get("/api/jobs").status_code == 200  # by the session cookie
    closed_api.post("/api/auth/signout")
    assert closed_api.get("/api/jobs").status_code == 401

    assert closed_api.post("/api/auth/signin", json={"token": TOKEN}).json()["name"] == "robot"
    assert PASSWORD not in caplog.text and TOKEN not in caplog.text  # never logged in clear


def test_repeated_failed_sign_ins_are_slowed(closed_api):
    for _ in range(10):
        closed_api.post("/api/auth/signin", json={"name": "mallory", "password": "guess"})
    r = closed_api.post("/api/auth/signin", json={"name": "mallory", "password": "guess"})
    assert r.status_code == 429 and "too many failed sign-ins" in r.json()["detail"]


def test_secrets_are_hashed_and_placeholders_refused(settings):
    stored = hash_password(PASSWORD)
    assert stored.startswith("scrypt$") and PASSWORD not in stored
    assert verify_secret(PASSWORD, stored) and not verify_secret("other", stored)
    assert verify_secret(TOKEN, hash_token(TOKEN)) and not verify_secret(TOKEN, "plain-text")
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    placeholder = settings.model_copy(update={"staff_tokens": {"admin": hash_token("changethis")}})
    with pytest.raises(SettingsError, match="placeholder"):
        make_api(placeholder, client)
    make_api(placeholder.model_copy(update={"environment": "development"}), client)  # accepted there
    with pytest.raises(SettingsError, match="not a scrypt"):
        make_api(settings.model_copy(update={"staff_passwords": {"bob": "hunter2"}}), client)


def test_actions_need_staff(api, store, settings):
    store.create(Job(id="a1", scan_id="s", pipeline="cartesian", state=JobState.FAILED, error="boom"))
    for path, body in [("/api/jobs/a1/retry", None), ("/api/jobs/a1/cancel", None),
                       ("/api/jobs/a1/priority", {"queue": "stat"}),
                       ("/api/scans/s/jobs", {"pipeline": "cartesian"})]:
        r = api.post(path, json=body)
        assert r.status_code == 401 and r.json()["detail"] == "sign in as staff to do this", path
    # a session cookie alone does not do: the page adds the action header (a cross-site form cannot)
    api.post("/api/auth/signin", json={"name": "alice", "password": PASSWORD})
    r = api.post("/api/jobs/a1/retry")
    assert r.status_code == 403 and ACTION_HEADER in r.json()["detail"]
    assert store.get("a1").state is JobState.FAILED and store.actions("a1") == []
    assert api.post("/api/jobs/a1/retry", headers={ACTION_HEADER: "1"}).status_code == 200
    assert store.actions("a1")[0]["who"] == "alice"


def test_retry_failed_job(api, store):
    store.create(Job(id="r1", scan_id="s", pipeline="cartesian", attempts=1))
    store.set_state("r1", JobState.FAILED, error="out of memory")
    r = api.post("/api/jobs/r1/retry", headers=STAFF)
    assert r.status_code == 200 and r.json()["state"] == "queued" and r.json()["error"] == ""
    assert r.json()["finished_at"] is None
    assert queue_ids(store, "routine") == ["r1.1"]  # a new task id: attempts go on counting
    (action,) = store.actions("r1")
    assert action["who"] == "robot" and action["action"] == "retry" and "out of memory" in action["detail"]
    assert api.get("/api/jobs/r1").json()["actions"][0]["action"] == "retry"
    again = api.post("/api/jobs/r1/retry", headers=STAFF)
    assert again.status_code == 409 and "only a failed job can be retried" in again.json()["detail"]


def test_cancel_queued_job_takes_it_off_its_queue(api, store, settings):
    job = Job(id="c1", scan_id="s", pipeline="cartesian")
    store.create(job)
    enqueue(store, api.app.state.actions.sender, job)
    assert queue_ids(store, "routine") == ["c1.0"]
    r = api.post("/api/jobs/c1/cancel", headers=STAFF)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert queue_ids(store, "routine") == []
    assert store.actions("c1")[0]["detail"] == "taken off queue routine"
    again = api.post("/api/jobs/c1/cancel", headers=STAFF)
    assert again.status_code == 409 and "c1 is cancelled" in again.json()["detail"]


def test_cancel_running_job_revokes_its_task(api, store):
    store.create(Job(id="c2", scan_id="s", pipeline="cartesian"))
    store.set_state("c2", JobState.RUNNING, attempts=1)
    control = store.redis.pubsub()
    control.psubscribe("*celery.pidbox*")  # Celery's broadcast channel to every worker
    control.get_message(timeout=1.0)  # the subscription's confirmation
    r = api.post("/api/jobs/c2/cancel", headers=STAFF)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert store.actions("c2")[0]["detail"] == "task revoked while running"
    broadcast = control.get_message(timeout=5.0)
    control.close()
    assert broadcast is not None
    command = json.loads(base64.b64decode(json.loads(broadcast["data"])["body"]))
    assert command["method"] == "revoke" and command["arguments"]["task_id"] == ["c2.0", "c2.1"]


def test_change_priority_moves_the_queued_job(api, store):
    job = Job(id="p1", scan_id="s", pipeline="cartesian", queue="bulk")
    store.create(job)
    enqueue(store, api.app.state.actions.sender, job)
    queued_at = store.get("p1").queued_at
    r = api.post("/api/jobs/p1/priority", json={"queue": "stat"}, headers=STAFF)
    assert r.status_code == 200 and r.json()["queue"] == "stat" and r.json()["queued_at"] == queued_at
    assert queue_ids(store, "bulk") == [] and queue_ids(store, "stat") == ["p1.0"]
    assert store.actions("p1")[0]["detail"] == "queue bulk -> stat"
    same = api.post("/api/jobs/p1/priority", json={"queue": "stat"}, headers=STAFF)
    assert same.status_code == 409 and "on queue stat already" in same.json()["detail"]
    bad = api.post("/api/jobs/p1/priority", json={"queue": "urgent"}, headers=STAFF)
    assert bad.status_code == 422 and "queue" in bad.json()["detail"]
    store.redis.delete("stat")  # a worker took it meanwhile
    gone = api.post("/api/jobs/p1/priority", json={"queue": "bulk"}, headers=STAFF)
    assert gone.status_code == 409 and "taken by a worker" in gone.json()["detail"]


def gpu_with_waiting_jobs(store, *jobs: tuple[str, str, float]) -> Admission:
    """GPU ``g0`` (24 GB) with one live worker ``w`` running a 20 GB job, and ``jobs`` (id, queue, time
    queued) of 10 GB each waiting for its memory, as the worker's admission leaves them."""
    adm = Admission(store.redis)
    adm.register_gpu("g0", 24 * GB, 24 * GB, "{}")
    store.redis.set(WORKER_HEARTBEAT + "w", "{}", px=60_000)
    adm.register_worker("g0", "w")
    store.create(Job(id="big", scan_id="s", pipeline="cartesian", queued_at=1.0))
    assert adm.admit("g0", "big", 20 * GB, "w", waiting_score("routine", 1.0)).verdict is Verdict.RUN
    for job_id, queue, at in jobs:
        store.create(Job(id=job_id, scan_id="s", pipeline="cartesian", queue=queue, queued_at=at))
        verdict = adm.admit("g0", job_id, 10 * GB, "w", waiting_score(queue, at)).verdict
        assert verdict in (Verdict.WAIT, Verdict.HELD)  # held: for an older job that waits already
    return adm


def dispatch_to_gpu(api, store, adm: Admission, job_id: str) -> None:
    """Free ``g0`` so that ``job_id`` is reserved there (pending) and sent to ``gpu.g0``, as a worker does."""
    adm.release("g0", "big", "w")
    assert adm.fill("g0", "w") == [job_id]
    api.app.state.actions.sender.celery.send_task(RUN_JOB_TASK, args=[job_id], queue=gpu_queue("g0"),
                                           task_id=f"{job_id}.0")


def test_cancel_job_waiting_for_gpu_memory_takes_it_out_of_the_waiting_set(api, store):
    adm = gpu_with_waiting_jobs(store, ("cw", "routine", 2.0), ("cw2", "routine", 3.0))
    r = api.post("/api/jobs/cw/cancel", headers=STAFF)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert [j for j, _, _ in adm.waiting()] == ["cw2"] and not store.redis.hexists("reconq:waitneed", "cw")
    assert store.actions("cw")[0]["detail"] == "taken off the jobs waiting for GPU memory"
    adm.release("g0", "big", "w")
    assert adm.fill("g0", "w") == ["cw2"]  # its memory goes to the next waiting job


def test_cancel_job_admitted_to_a_gpu_takes_its_message_and_reservation(api, store):
    adm = gpu_with_waiting_jobs(store, ("cg", "routine", 2.0))
    dispatch_to_gpu(api, store, adm, "cg")
    assert queue_ids(store, "gpu.g0") == ["cg.0"] and [r.job_id for r in adm.reservations("g0")] == ["cg"]
    r = api.post("/api/jobs/cg/cancel", headers=STAFF)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert queue_ids(store, "gpu.g0") == [] and adm.reservations("g0") == []
    assert store.actions("cg")[0]["detail"] == "taken off queue gpu.g0; GPU memory reserved for it on g0 freed"


def test_cancel_job_in_the_cpu_queue_takes_its_message(api, store):
    store.create(Job(id="cc", scan_id="s", pipeline="cartesian"))
    api.app.state.actions.sender.celery.send_task(RUN_JOB_TASK, args=["cc"], queue="cpu", task_id="cc.0")
    assert api.post("/api/jobs/cc/cancel", headers=STAFF).status_code == 200
    assert queue_ids(store, "cpu") == [] and store.actions("cc")[0]["detail"] == "taken off queue cpu"


def test_change_priority_of_a_waiting_job_orders_it_again(api, store):
    adm = gpu_with_waiting_jobs(store, ("r1", "routine", 2.0), ("b1", "bulk", 1.5), ("r2", "routine", 3.0))
    assert [j for j, _, _ in adm.waiting()] == ["r1", "r2", "b1"]
    r = api.post("/api/jobs/b1/priority", json={"queue": "stat"}, headers=STAFF)
    assert r.status_code == 200 and r.json()["queue"] == "stat" and r.json()["queued_at"] == 1.5
    assert [(j, s) for j, _, s in adm.waiting()] == [("b1", waiting_score("stat", 1.5)),
                                                     ("r1", waiting_score("routine", 2.0)),
                                                     ("r2", waiting_score("routine", 3.0))]
    assert "ordered again among the jobs waiting for GPU memory" in store.actions("b1")[0]["detail"]
    adm.release("g0", "big", "w")
    assert adm.fill("g0", "w")[0] == "b1"  # a stat job goes first
    r = api.post("/api/jobs/r2/priority", json={"queue": "bulk"}, headers=STAFF)
    assert r.status_code == 200 and [j for j, _, _ in adm.waiting()] == ["r1", "r2"]  # still its turn after r1


def test_change_priority_of_an_admitted_job_keeps_its_place(api, store):
    adm = gpu_with_waiting_jobs(store, ("pa", "bulk", 2.0))
    dispatch_to_gpu(api, store, adm, "pa")
    r = api.post("/api/jobs/pa/priority", json={"queue": "stat"}, headers=STAFF)
    assert r.status_code == 200 and r.json()["queue"] == "stat" and r.json()["state"] == "queued"
    assert queue_ids(store, "gpu.g0") == ["pa.0"] and queue_ids(store, "stat") == []  # it is about to run
    assert [r.job_id for r in adm.reservations("g0")] == ["pa"]
    assert "already admitted to gpu.g0, it keeps its place" in store.actions("pa")[0]["detail"]
    store.set_state("pa", JobState.RUNNING, attempts=1)
    running = api.post("/api/jobs/pa/priority", json={"queue": "bulk"}, headers=STAFF)
    assert running.status_code == 409 and "pa is running" in running.json()["detail"]


def test_retro_recon_makes_new_jobs_on_a_stored_scan(api, store, settings):
    record = stored_scan(settings)
    store.create(Job(id="scan1-j1", scan_id="scan1", pipeline="cartesian"))
    r = api.post("/api/scans/scan1/jobs", json={"pipeline": "cartesian", "params": {"lambda": 0.5}},
                 headers=STAFF)
    assert r.status_code == 201, r.json()
    job = r.json()
    assert job["id"] == "scan1-j2" and job["queue"] == "bulk" and job["params"] == {"lambda": 0.5}
    assert job["protocol"] == record.protocol and queue_ids(store, "bulk") == ["scan1-j2.0"]
    r2 = api.post("/api/scans/scan1/jobs", json={"pipeline": "cartesian", "queue": "stat"}, headers=STAFF)
    assert r2.json()["id"] == "scan1-j3" and r2.json()["params"] == {"lambda": 0.1}  # the scan's own
    assert store.actions("scan1-j3")[0]["action"] == "retro-recon"

    unknown = api.post("/api/scans/scan1/jobs", json={"pipeline": "magic"}, headers=STAFF)
    assert unknown.status_code == 422 and "unknown pipeline 'magic'; known pipelines:" in unknown.json()["detail"]
    missing = api.post("/api/scans/nope/jobs", json={"pipeline": "cartesian"}, headers=STAFF)
    assert missing.status_code == 404 and "no stored scan 'nope'" in missing.json()["detail"]
    stored_scan(settings, "cut", ScanState.INCOMPLETE)
    cut = api.post("/api/scans/cut/jobs", json={"pipeline": "cartesian"}, headers=STAFF)
    assert cut.status_code == 409 and "scan cut is incomplete" in cut.json()["detail"]
    empty = api.post("/api/scans/scan1/jobs", json={}, headers=STAFF)
    assert empty.status_code == 422 and "pipeline: Field required" in empty.json()["detail"]


def test_queues_retrievals_and_pipelines(api, store):
    store.redis.rpush("stat", "m1")
    store.redis.rpush("bulk", "m2", "m3")
    assert api.get("/api/queues").json() == [{"name": "stat", "depth": 1}, {"name": "routine", "depth": 0},
                                             {"name": "bulk", "depth": 2}]
    empty = api.get("/api/retrievals").json()
    assert empty["day"] == {"found": 0, "not_found": 0, "rate": None}
    for found in (True, True, True, False):
        store.record_retrieval(found)
    assert api.get("/api/retrievals").json()["week"] == {"found": 3, "not_found": 1, "rate": 0.75}
    assert "cartesian" in api.get("/api/pipelines").json()


def test_metrics_in_prometheus_text(api, store):
    store.create(Job(id="m1", scan_id="s", pipeline="cartesian"))
    store.create(Job(id="m2", scan_id="s", pipeline="cartesian"))
    store.set_state("m2", JobState.RUNNING, attempts=1, started_at=100.0)
    store.set_state("m2", JobState.DONE, finished_at=145.0)
    store.redis.rpush("routine", "x")
    store.record_retrieval(True)
    store.redis.hset("reconq:stats:gateway", mapping={"bytes_received_total": 1234, "sessions_active": 2})
    r = api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = set(r.text.splitlines())
    assert {'reconq_jobs{state="queued"} 1', 'reconq_jobs{state="done"} 1', 'reconq_queue_depth{queue="routine"} 1',
            'reconq_job_run_seconds_bucket{le="30.0"} 0', 'reconq_job_run_seconds_bucket{le="60.0"} 1',
            "reconq_job_run_seconds_sum 45", 'reconq_retrievals_total{outcome="found"} 1',
            "reconq_gateway_bytes_received_total 1234", "reconq_gateway_sessions_active 2",
            "# TYPE reconq_job_run_seconds histogram"} <= lines


def test_metrics_and_gpu_panel_source_show_gpu_memory(api, store):
    state = {"name": "Simulated 24 GB", "host": "n1", "index": 0, "simulated": True, "total_bytes": 24 << 30,
             "used_bytes": 3 << 30, "free_bytes": 21 << 30, "utilization_pct": 40.0, "temperature_c": None}
    store.redis.hset(GPU_STATE, "n1:0", json.dumps(state))
    store.redis.hset(GPU_SEEN, "n1:0", time.time())
    lines = set(api.get("/metrics").text.splitlines())
    labels = '{gpu="n1:0",host="n1",simulated="true"}'
    assert {f"reconq_gpu_memory_used_bytes{labels} {3 << 30}", f"reconq_gpu_memory_total_bytes{labels} {24 << 30}",
            f"reconq_gpu_utilization_percent{labels} 40"} <= lines
    assert not any(line.startswith("reconq_gpu_temperature_celsius{") for line in lines)  # not reported
    assert api.get("/api/gpus").json()["gpus"][0]["used_bytes"] == 3 << 30  # what the GPU panel reads


def test_openapi_is_complete_and_typed(api):
    spec = api.get("/openapi.json").json()
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/images", "/api/jobs/{job_id}/dicom",
            "/api/jobs/{job_id}/previews/{index}.png", "/api/jobs/{job_id}/retry", "/api/jobs/{job_id}/cancel",
            "/api/jobs/{job_id}/priority", "/api/scans/{scan_id}/jobs", "/api/queues", "/api/retrievals",
            "/api/pipelines", "/api/health", "/api/events", "/api/auth/signin", "/api/auth/signout",
            "/api/auth/me", "/api/vocabulary", "/api/gpus", "/api/disk", "/metrics"} <= set(spec["paths"])

    def untyped(node, where):  # a schema that says nothing is an `Any`
        if isinstance(node, dict):
            if "schema" in node and node["schema"] == {}:
                yield where
            for key, value in node.items():
                if key in ("properties", "schemas"):
                    for name, sub in value.items():
                        if sub == {}:
                            yield f"{where}.{name}"
                yield from untyped(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from untyped(value, f"{where}[{i}]")

    assert list(untyped(spec, "")) == []
    for path, ops in spec["paths"].items():
        for op in ops.values():
            ok = op["responses"]["200"] if "200" in op["responses"] else op["responses"]["201"]
            assert "content" in ok, path
            for err in op["responses"]:
                if err.startswith("4"):
                    schema = op["responses"][err]["content"]["application/json"]["schema"]["$ref"]
                    assert schema.endswith(("/Problem", "/ValidationProblem")), (path, err)


def test_health_is_503_while_redis_is_stopped(settings, tmp_path):
    """A Redis of its own, really stopped: the health check (compose's, the load balancer's) gets 503 with the
    same body shape, and 200 again once Redis is back."""
    from reconq.core.redisconn import PrivateRedis

    server = PrivateRedis(tmp_path / "own-redis")
    server.start()
    try:
        own = settings.model_copy(update={"redis_url": server.url})
        claim_data_root(own)
        client = make_client(own)
        ok = client.get("/api/health")
        assert ok.status_code == 200 and ok.json() == {"status": "ok", "redis": True}
        server.stop()
        down = client.get("/api/health")
        assert down.status_code == 503, down.text
        assert down.json() == {"status": "degraded", "redis": False}
        assert down.headers["content-type"].startswith("application/json")
        server.start()
        assert client.get("/api/health").status_code == 200
    finally:
        server.stop()


def test_health_reports_redis(api):
    answer = api.get("/api/health")
    assert answer.status_code == 200 and answer.json() == {"status": "ok", "redis": True}
    spec = api.get("/openapi.json").json()["paths"]["/api/health"]["get"]["responses"]
    assert spec["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/Health")


# --- disk use -------------------------------------------------------------------------------------

def write_bytes(path: Path, n: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * n)
    return n


def test_disk_use_for_staff_matches_statvfs_and_the_files(settings):
    import os

    from reconq.core.diskuse import disk_usage

    scans = Path(settings.data_dir) / "scans"
    raw = write_bytes(scans / "d1" / "raw.h5", 12345) + write_bytes(scans / "d2" / ".raw.h5.part", 777)
    results = (write_bytes(scans / "d1" / "results" / "d1-j1-run1.h5", 1000)
               + write_bytes(scans / "d1" / "results" / "d1-j2-run1.h5", 2000)
               + write_bytes(scans / "d2" / "results" / "d2-j1-run1.h5", 30))
    write_bytes(scans / "d1" / "scan.json", 50)  # neither raw nor result
    write_bytes(scans / "d1" / "results" / "notes.txt", 99)
    viewer = "viewer-disk-token-0123456789"
    tokens = {"robot": hash_token(TOKEN), "vera": {"hash": hash_token(viewer), "role": "viewer"}}
    client = make_client(settings, dashboard_public_read=True, staff_tokens=tokens)

    anonymous = client.get("/api/disk")  # public read shows the queue, not the disk
    assert anonymous.status_code == 401 and "sign in as staff" in anonymous.json()["detail"]
    answer = client.get("/api/disk", headers={"Authorization": f"Bearer {viewer}"})
    assert answer.status_code == 200, answer.text
    d = answer.json()
    st = os.statvfs(settings.data_dir)
    assert d["total_bytes"] == st.f_blocks * st.f_frsize
    assert abs(d["free_bytes"] - st.f_bavail * st.f_frsize) < 256 << 20  # others write on this disk meanwhile
    assert abs(d["used_bytes"] - (st.f_blocks - st.f_bfree) * st.f_frsize) < 256 << 20
    assert d["raw"] == {"count": 2, "bytes": raw} and d["results"] == {"count": 3, "bytes": results}
    assert d["min_free_bytes"] == settings.min_free_bytes == 0 and d["low"] is False

    write_bytes(scans / "d3" / "raw.h5", 5)  # the walk is kept for a minute: the next poll does not walk
    assert client.get("/api/disk", headers=STAFF).json()["raw"] == {"count": 2, "bytes": raw}
    assert disk_usage(settings.data_dir, max_age_s=0).raw.count == 3  # walked again
    low = make_client(settings, min_free_bytes=d["total_bytes"] + 1).get("/api/disk", headers=STAFF).json()
    assert low["low"] is True and low["min_free_bytes"] == d["total_bytes"] + 1

    lines = set(client.get("/metrics").text.splitlines())
    assert f"reconq_disk_total_bytes {st.f_blocks * st.f_frsize}" in lines
    assert "# TYPE reconq_disk_free_bytes gauge" in lines
    free = next(int(line.split()[1]) for line in lines if line.startswith("reconq_disk_free_bytes "))
    assert abs(free - st.f_bavail * st.f_frsize) < 256 << 20


# --- patient names: staff only --------------------------------------------------------------------

def test_patient_names_for_staff_never_for_public_read_nor_logs(api, store, settings, caplog):
    """The name is read from the scan's raw MRD header (the records keep the ID alone), or from a done job's
    result file once the raw scan is gone; staff of any role get it, public readers never."""
    import logging

    caplog.set_level(logging.DEBUG)
    name = "Zyxwort^Hermione"
    ScanStore(settings.data_dir).create(ScanRecord(scan_id="pn", state=ScanState.COMPLETE, patient_id="PN777"))
    write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2, patient_id="PN777", patient_name=name, study_uid="1.2.77"),
              ScanStore(settings.data_dir).raw_path("pn"))
    now = time.time()
    store.create(Job(id="pn-j1", scan_id="pn", pipeline="cartesian", protocol="t1", patient_id="PN777",
                     study_uid="1.2.77", created_at=now, queued_at=now))
    # a done job whose raw scan is gone (retention): the name from its result file's header
    store.create(Job(id="gone-j1", scan_id="gone", pipeline="cartesian", protocol="t1", patient_id="PAT12345",
                     created_at=now - 1))
    _, stored = stored_result(settings, "gone", "gone-j1")
    store.set_state("gone-j1", JobState.RUNNING, attempts=1)
    store.set_state("gone-j1", JobState.DONE, result_path=stored, progress=1.0)

    viewer = "viewer-name-token-0123456789"
    staff = make_client(settings, staff_tokens={"vera": {"hash": hash_token(viewer), "role": "viewer"}})
    as_viewer = {"Authorization": f"Bearer {viewer}"}
    jobs = {j["id"]: j for j in staff.get("/api/jobs", headers=as_viewer).json()["jobs"]}
    assert jobs["pn-j1"]["patient_name"] == name and jobs["pn-j1"]["patient"] == "PN777"
    assert jobs["gone-j1"]["patient_name"] == "Phantom^Demo"
    assert staff.get("/api/jobs/pn-j1", headers=as_viewer).json()["patient_name"] == name
    exams = staff.get("/api/exams", headers=as_viewer).json()["exams"]
    assert next(x for x in exams if x["patient"] == "PN777")["patient_name"] == name

    for path in ("/api/jobs", "/api/jobs/pn-j1", "/api/exams", "/api/jobs/gone-j1"):
        public = api.get(path)
        assert public.status_code == 200, path
        assert "Zyxwort" not in public.text and "Hermione" not in public.text and "Phantom" not in public.text, path
        assert "PN777" not in public.text, path
    assert all("patient_name" not in j for j in api.get("/api/jobs").json()["jobs"])  # not even the key
    assert all("patient_name" not in x for x in api.get("/api/exams").json()["exams"])
    assert "patient_name" not in api.get("/api/jobs/pn-j1").json()
    assert "Zyxwort" not in caplog.text and "Hermione" not in caplog.text


def test_plugin_pipelines_are_offered_for_retro_recon(settings):
    examples = Path(__file__).resolve().parents[1] / "examples" / "plugins"
    api = make_client(settings, dashboard_public_read=True, plugin_dir=examples)
    assert "hann_fft" in api.get("/api/pipelines").json()


def test_retro_recon_of_several_scans_is_placed_as_one_batch(api, store, settings):
    scans = ScanStore(settings.data_dir)
    for scan_id in ("rb1", "rb2", "rb3"):
        stored_scan(settings, scan_id)
        write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2), scans.raw_path(scan_id))
    adm = Admission(store.redis)
    adm.register_gpu("g0", 24 * GB, 24 * GB, "{}")
    store.redis.set(WORKER_HEARTBEAT + "w", "{}", px=60_000)
    adm.register_worker("g0", "w")  # one live worker: one job can start now
    body = {"scan_ids": ["rb1", "rb2", "rb3"], "pipeline": "cartesian",
            "params": {"gpu_memory_gb": 10, "expected_seconds": 30}}
    assert api.post("/api/retro", json=body).status_code == 401
    refused = api.post("/api/retro", json={**body, "scan_ids": ["rb1", "nope"]}, headers=STAFF)
    assert refused.status_code == 404 and "no stored scan 'nope'" in refused.json()["detail"]
    assert store.query(limit=10)[1] == 0  # one scan refused: nothing queued
    r = api.post("/api/retro", json=body, headers=STAFF)
    assert r.status_code == 201, r.json()
    ids = [j["id"] for j in r.json()]
    assert [i.split("-j")[0] for i in ids] == ["rb1", "rb2", "rb3"]
    assert all(j["memory_estimate_gb"] == 10 and j["expected_run_time_s"] == 30 for j in r.json())
    # placed at submit: one reserved on g0 and sent to its queue, two waiting for memory; none on `bulk`
    assert queue_ids(store, "bulk") == [] and len(queue_ids(store, "gpu.g0")) == 1
    assert sorted([r.job_id for r in adm.reservations("g0")] + [j for j, _, _ in adm.waiting()]) == ids
    for job_id in ids:
        job = store.get(job_id)
        assert job.state is JobState.QUEUED and job.queue == "bulk"
        assert job.mem_estimate_bytes == 10 * GB and job.runtime_estimate_s == 30
        assert store.actions(job_id)[0]["action"] == "retro-recon"


def test_a_job_moved_to_another_queue_keeps_its_age_among_waiting_jobs(api, store, settings):
    adm = gpu_with_waiting_jobs(store)  # g0: 4 GB free, its one worker busy
    stored_scan(settings, "mv")
    write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2), ScanStore(settings.data_dir).raw_path("mv"))
    job = Job(id="mv-j1", scan_id="mv", pipeline="cartesian", queue="bulk", params={"gpu_memory_gb": 10})
    store.create(job)
    enqueue(store, api.app.state.actions.sender, job, since=1.5)  # on its queue since t = 1.5
    assert queue_ids(store, "bulk") == ["mv-j1.0"]
    r = api.post("/api/jobs/mv-j1/priority", json={"queue": "stat"}, headers=STAFF)
    assert r.status_code == 200 and r.json()["queued_at"] == 1.5
    # placed on the move: waiting for g0's memory, ordered as a stat job queued at 1.5, not as a new one
    assert adm.waiting() == [("mv-j1", 10 * GB, waiting_score("stat", 1.5))]
    assert queue_ids(store, "bulk") == [] and queue_ids(store, "stat") == []


def test_vocabulary_is_the_state_machine_and_the_queues(api, closed_api):
    v = api.get("/api/vocabulary").json()
    assert v["states"] == [s.value for s in JobState]
    assert v["transitions"] == {s.value: sorted(t.value for t in nxt) for s, nxt in TRANSITIONS.items()}
    assert set(v["finished"]) == {s.value for s in FINISHED} and set(v["active"]) == {s.value for s in ACTIVE}
    assert set(v["cancellable"]) == {s.value for s in CANCELLABLE} == set(v["actions"]["cancel"])
    assert v["queues"] == [q.value for q in QUEUE_ORDER] == ["stat", "routine", "bulk"]
    assert v["actions"]["retry"] == ["failed"] and set(v["actions"]["priority"]) == {"queued", "waiting_inputs"}
    assert closed_api.get("/api/vocabulary").status_code == 401  # as /api/queues


def test_every_action_error_has_an_http_status():
    assert set(ActionError.__subclasses__()) <= set(ACTION_ERROR_STATUS)


def redis_snapshot(url: str) -> dict[bytes, tuple[bytes, bool]]:
    """Every key of the database with its serialised value (``DUMP``) and whether it expires."""
    raw = redis.Redis.from_url(url)
    return {k: (raw.dump(k), raw.pttl(k) > 0) for k in sorted(raw.scan_iter(count=1000))}


def test_gpus_and_metrics_only_read_and_skip_what_dead_workers_left(api, store, settings):
    """What dead workers leave behind (a name in the worker index, reservations) is skipped by the reads
    and removed by a live worker's heartbeat."""
    state = {"name": "Simulated 24 GB", "host": "n1", "index": 0, "simulated": True, "total_bytes": 24 * GB,
             "used_bytes": 0, "free_bytes": 24 * GB, "utilization_pct": None, "temperature_c": None}
    adm = Admission(store.redis)
    adm.register_gpu("n1:0", 24 * GB, 24 * GB, json.dumps(state))
    beat = {"host": "n1", "pid": 7, "gpu_id": "n1:0", "job": "r-live", "job_since": 1.0, "seen": time.time(),
            "queues": ["gpu.n1:0"]}
    store.redis.set(WORKER_HEARTBEAT + "live", json.dumps(beat), px=60_000)
    store.redis.sadd(WORKERS_INDEX, "live", "gone")  # "gone": its heartbeat expired
    adm.register_worker("n1:0", "live")
    store.create(Job(id="r-pend", scan_id="s", pipeline="cartesian"))
    store.set_state("r-pend", JobState.CANCELLED)  # reserved for it, then cancelled before any worker took it
    store.redis.hset(GPU_RESERVATIONS + "n1:0", mapping={"r-live": 4 * GB, "r-dead": 6 * GB, "r-pend": 2 * GB})
    store.redis.hset(GPU_RESERVATION_OWNERS + "n1:0",
                     mapping={"r-live": "live", "r-dead": "gone", "r-pend": "live" + PENDING_SUFFIX})

    before = redis_snapshot(settings.redis_url)
    gpus = api.get("/api/gpus").json()
    metrics = api.get("/metrics").text
    assert redis_snapshot(settings.redis_url) == before  # nothing written, nothing pruned

    (gpu,) = gpus["gpus"]
    assert [w["name"] for w in gpu["workers"]] == ["live"] and gpu["alive"]
    assert [r["job_id"] for r in gpu["reservations"]] == ["r-live"] and gpu["reserved_bytes"] == 4 * GB
    assert f'reconq_gpu_memory_reserved_bytes{{gpu="n1:0",host="n1",simulated="true"}} {4 * GB}' in metrics

    quick = settings.model_copy(update={"heartbeat_ttl_s": 0.5, "heartbeat_interval_s": 0.1})
    heartbeat = Heartbeat(quick, store.redis, adm, Slot(None, "", False, ("routine",)), SimulatedInventory([24]),
                          "live", send=lambda job, queue: None)
    deadline = time.monotonic() + 5
    while not heartbeat.settled() and time.monotonic() < deadline:  # not within a beat of Redis's start
        time.sleep(0.1)
    heartbeat.prune()  # a writer: the live worker's heartbeat removes what the dead one left
    assert store.redis.smembers(WORKERS_INDEX) == {"live"}
    assert [r.job_id for r in adm.reservations("n1:0")] == ["r-live"]


def test_with_redis_unreachable_the_api_answers_503_json_saying_why(settings):
    """Nothing listens where the API's Redis should be (a real refused connection): the job routes answer
    503 JSON with the reason and ``Retry-After``, not a plain-text 500."""
    from reconq.core.redisconn import free_port

    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    client = make_client(down, dashboard_public_read=True)
    for path in ("/api/jobs", "/api/exams"):
        answer = client.get(path)
        assert answer.status_code == 503, (path, answer.text)
        assert answer.headers["content-type"].startswith("application/json")
        assert "Redis is unavailable" in answer.json()["detail"] and answer.headers["retry-after"] == "5"


def test_a_result_path_in_redis_is_never_served(api, store, settings, tmp_path):
    """Whoever can write a job record cannot make the API serve a file it names: not one outside the data
    root, not another job's result inside it. The job's own file (derived from its ids and run) or nothing."""
    outside = tmp_path / "elsewhere.h5"
    result_file(outside, nslices=5)
    _, other = stored_result(settings, "s", "other-j1")  # another job's images, inside the root's scans
    names = (str(outside), "../elsewhere.h5", "scans/../../elsewhere.h5", other, "/etc/shadow")
    for name in names:
        store.create(Job(id="x1", scan_id="s", pipeline="cartesian", protocol="t1"))
        store.set_state("x1", JobState.RUNNING, attempts=1)
        store.set_state("x1", JobState.DONE, result_path=name)
        for route in ("images", "dicom", "previews/0.png"):
            answer = api.get(f"/api/jobs/x1/{route}", headers=STAFF)
            assert answer.status_code == 409, (name, route, answer.status_code)
        assert api.get("/api/jobs/x1", headers=STAFF).json()["image_count"] == 0
        store.redis.delete(JOB_KEY + "x1")
    own, _ = stored_result(settings, "s", "x1", run=2)  # its own file: served, whatever the record names
    store.create(Job(id="x1", scan_id="s", pipeline="cartesian", protocol="t1"))
    store.set_state("x1", JobState.RUNNING, attempts=2)
    store.set_state("x1", JobState.DONE, result_path=str(outside))
    got = api.get("/api/jobs/x1/images", headers=STAFF)
    assert got.status_code == 200
    downloaded = tmp_path / "got.h5"
    downloaded.write_bytes(got.content)
    assert len(read_images(downloaded)) == len(own) == 3  # not the 5 images of the file the record names
    # ids that would leave the folder (a forged record) name no file; a record whose id is not its key's: 404
    for forged in ({"scan_id": "../.."}, {"scan_id": ".hidden"}, {"attempts": "-1"}):
        store.redis.hset(JOB_KEY + "x1", mapping=forged)
        assert api.get("/api/jobs/x1/images", headers=STAFF).status_code == 409, forged
        store.redis.hset(JOB_KEY + "x1", mapping={"scan_id": "s", "attempts": "2"})
    store.redis.hset(JOB_KEY + "x1", "id", "../../etc/x1")
    assert api.get("/api/jobs/x1/images", headers=STAFF).status_code == 404


def test_a_result_is_found_from_the_ids_whatever_path_the_record_names(api, store, settings):
    """A node that mounts the shared root at another place (or an older record) may have recorded another
    path: the file is found from the job's scan, id and run under this root, not from that path."""
    images, stored = stored_result(settings, "s9", "n1")
    store.create(Job(id="n1", scan_id="s9", pipeline="cartesian", protocol="t1"))
    store.set_state("n1", JobState.RUNNING, attempts=1)
    store.set_state("n1", JobState.DONE, result_path="/mnt/other-node/reconq-data/" + stored)
    assert api.get("/api/jobs/n1").json()["image_count"] == len(images)


def test_dicom_uids_are_under_the_configured_root(settings, store):
    """RECONQ_DICOM_UID_ROOT reaches the export through the API: every UID ReconQ makes starts with it."""
    _, stored = stored_result(settings, "sroot", "droot")
    store.create(Job(id="droot", scan_id="sroot", pipeline="cartesian", protocol="t1"))
    store.set_state("droot", JobState.RUNNING, attempts=1)
    store.set_state("droot", JobState.DONE, result_path=stored)
    api = make_client(settings, dashboard_public_read=True, dicom_uid_root="1.2.826.0.1.999")
    z = api.get("/api/jobs/droot/dicom", headers=STAFF)
    assert z.status_code == 200
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        files = [pydicom.dcmread(io.BytesIO(zf.read(name))) for name in zf.namelist()]
    for ds in files:
        assert ds.SOPInstanceUID.startswith("1.2.826.0.1.999.") and ds.SeriesInstanceUID.startswith("1.2.826.0.1.999.")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
