"""Patient data in the HTTP API (issue 16, item 4): what public-read shows (no previews, parameters, logs,
measurement ids; identifiers masked by a keyed hash), the audit log of views, downloads and actions (and
downloads refused when it cannot be written), and the role the dashboard is told."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from reconq.api.audit import AUDIT_STREAM, audit_file
from reconq.api.auth import hash_token, load_secret
from reconq.api.routes.events import _event_stream, public_event
from reconq.api.schemas import Masker
from reconq.core.constants import EVENTS_CHANNEL
from reconq.core.jobs import Job
from reconq.core.results import result_file as derived_result_file
from reconq.core.results import write_images
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.recon.simulate import synthetic_scan
from reconq.services import make_api

ADMIN_TOKEN = "admin-token-0123456789abcdef"
VIEWER_TOKEN = "viewer-token-0123456789abcdef"
TECH_TOKEN = "tech-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
VIEWER = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
TECH = {"Authorization": f"Bearer {TECH_TOKEN}"}

# The test scan's patient data: none of it may reach a viewer who is not signed in.
PATIENT_ID = "PATX90210"
PATIENT_NAME = "Doe^Jane"
BIRTH_DATE = "1961-07-04"
STUDY_UID = "1.2.826.0.1.3680043.99.4711"
MEASUREMENT_ID = "66001_4711_8822_101"
PARAM_SECRET = "param-secret-lambda"
LOG_SECRET = "log-secret-line"
RAW = (PATIENT_ID, PATIENT_NAME, "Doe", BIRTH_DATE, "19610704", STUDY_UID, MEASUREMENT_ID, PARAM_SECRET, LOG_SECRET)


def make_client(settings, **changes) -> TestClient:
    settings = settings.model_copy(update={
        "staff_tokens": {"root": {"hash": hash_token(ADMIN_TOKEN), "role": "admin"},
                         "vera": {"hash": hash_token(VIEWER_TOKEN), "role": "viewer"},
                         "tom": {"hash": hash_token(TECH_TOKEN), "role": "technologist"}},
        "dashboard_public_read": True, **changes})
    return TestClient(make_api(settings, redis.Redis.from_url(settings.redis_url, decode_responses=True)))


@pytest.fixture
def api(settings) -> TestClient:
    return make_client(settings)


def make_job(settings, store, job_id: str = "pd-j1", scan_id: str = "pd", patient_id: str = PATIENT_ID,
             done: bool = True) -> Job:
    """A done job of the test scan, its result file (with the scan's MRD header) where the worker writes it."""
    job = Job(id=job_id, scan_id=scan_id, pipeline="cartesian", params={"note": PARAM_SECRET}, protocol="t1_pd",
              patient_id=patient_id, study_uid=STUDY_UID, measurement_id=MEASUREMENT_ID, created_at=time.time())
    store.create(job)
    store.log(job_id, f"{LOG_SECRET} {patient_id}")
    if not done:
        return job
    scan = synthetic_scan(matrix=(32, 32), ncoil=2, nslices=2, protocol="t1_pd", patient_id=patient_id,
                          patient_name=PATIENT_NAME, study_uid=STUDY_UID, measurement_id=MEASUREMENT_ID)
    scan.header.subjectInformation.patientBirthdate = BIRTH_DATE
    scans = ScanStore(settings.data_dir)
    path = derived_result_file(scans, Job(id=job_id, scan_id=scan_id, pipeline="cartesian", attempts=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    images = []
    for s in range(2):
        image = ismrmrd.Image.from_array(np.full((32, 32), 100 * (s + 1), dtype=np.uint16))
        image.image_index, image.image_series_index, image.slice = s + 1, 1, s
        image.field_of_view = (220.0, 220.0, 5.0)
        image.read_dir, image.phase_dir, image.slice_dir = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
        images.append(image)
    write_images(path, images, ismrmrd.xsd.ToXML(scan.header))
    store.set_state(job_id, JobState.RUNNING, attempts=1)
    store.set_state(job_id, JobState.DONE, result_path=scans.stored(path), progress=1.0)
    return job


def assert_no_patient_data(body: str, where: str) -> None:
    for raw in RAW:
        assert raw not in body, f"{raw!r} in {where}: {body[:500]}"


def audit_lines(settings) -> list[dict]:
    path = audit_file(settings.data_dir, datetime.now(UTC))
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- public read: no patient data -------------------------------------------------------------------

def test_public_read_answers_carry_no_patient_data(api, settings, store):
    make_job(settings, store)
    masked = Masker(load_secret(settings.data_dir)).mask(PATIENT_ID)
    assert re.fullmatch(r"P-[0-9a-f]{6}", masked)

    page = api.get("/api/jobs")
    assert page.status_code == 200
    assert_no_patient_data(page.text, "the job list")
    job = page.json()["jobs"][0]
    assert job["patient"] == masked and job["measurement_id"] == "" and job["params"] == {} and job["redacted"]

    detail = api.get("/api/jobs/pd-j1")
    assert detail.status_code == 200
    assert_no_patient_data(detail.text, "the job detail")
    one = detail.json()
    assert one["log"] == [] and one["previews"] == [] and one["report"] == {} and one["image_count"] == 2
    assert one["patient"] == masked and one["redacted"]

    exams = api.get("/api/exams")
    assert exams.status_code == 200
    assert_no_patient_data(exams.text, "the exams")
    exam = exams.json()["exams"][0]
    assert exam["patient"] == masked and re.fullmatch(r"S-[0-9a-f]{6}", exam["study_uid"])

    for path in ("/api/jobs/pd-j1/previews/0.png", "/api/jobs/pd-j1/images", "/api/jobs/pd-j1/dicom"):
        r = api.get(path)
        assert r.status_code == 401 and "sign in as staff" in r.json()["detail"], path
    for path in ("/metrics", "/api/queues", "/api/gpus", "/api/retrievals"):
        assert_no_patient_data(api.get(path).text, path)


def test_signed_in_staff_see_everything(api, settings, store):
    make_job(settings, store)
    for headers in (VIEWER, ADMIN):
        one = api.get("/api/jobs/pd-j1", headers=headers).json()
        assert one["patient"] == PATIENT_ID and one["measurement_id"] == MEASUREMENT_ID and not one["redacted"]
        assert one["params"] == {"note": PARAM_SECRET} and LOG_SECRET in one["log"][0] and one["previews"] == [0, 1]
        exam = api.get("/api/exams", headers=headers).json()["exams"][0]
        assert exam["patient"] == PATIENT_ID and exam["study_uid"] == STUDY_UID
        png = api.get("/api/jobs/pd-j1/previews/0.png", headers=headers)
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.headers["cache-control"] == "no-store"


def test_the_mask_is_stable_per_patient_keyed_and_not_a_bare_hash(api, settings, store, tmp_path):
    make_job(settings, store, "a-j1", "a", "PAT0001", done=False)
    make_job(settings, store, "a-j2", "a2", "PAT0001", done=False)
    make_job(settings, store, "b-j1", "b", "PAT0002", done=False)
    seen = {j["id"]: j["patient"] for j in api.get("/api/jobs").json()["jobs"]}
    assert seen["a-j1"] == seen["a-j2"] != seen["b-j1"]  # one patient, one mask; another patient, another
    assert seen == {j["id"]: j["patient"] for j in api.get("/api/jobs").json()["jobs"]}  # stable
    bare = hashlib.sha256(b"PAT0001").hexdigest()
    assert seen["a-j1"][2:] not in bare  # not a prefix (nor any part) of the bare SHA-256
    other = Masker(b"another server secret of 32 bytes!")
    assert other.mask("PAT0001") != seen["a-j1"]  # keyed: another server's secret, another mask
    assert Masker(load_secret(settings.data_dir)).mask("PAT0001") == seen["a-j1"]
    assert Masker(b"x" * 32).mask("") == ""  # no ID: nothing to tell apart


def test_events_for_anonymous_viewers_carry_ids_and_states_only(settings):
    assert json.loads(public_event(json.dumps({"id": "j1", "state": "done", "patient_id": PATIENT_ID,
                                               "study_uid": STUDY_UID}))) == {"id": "j1", "state": "done"}
    assert public_event("not json") is None and public_event("[1]") is None

    class Request:  # the stream's view of the request: disconnected after a few polls
        polls = 0

        async def is_disconnected(self) -> bool:
            self.polls += 1
            return self.polls > 3

    async def read(staff: bool) -> list[str]:
        client = redis.Redis.from_url(settings.redis_url)
        out = []
        gen = _event_stream(Request(), settings.redis_url, staff, settings)  # type: ignore[arg-type]
        out.append(await gen.__anext__())  # hello: subscribed
        client.publish(EVENTS_CHANNEL, json.dumps({"id": "pd-j1", "progress": 0.5, "measurement_id": MEASUREMENT_ID,
                                                   "patient_id": PATIENT_ID}))
        async for chunk in gen:
            out.append(chunk)
        client.close()
        return out

    anonymous = "".join(asyncio.run(read(staff=False)))
    assert '"id": "pd-j1"' in anonymous and '"progress": 0.5' in anonymous
    assert_no_patient_data(anonymous, "the event stream")
    assert MEASUREMENT_ID in "".join(asyncio.run(read(staff=True)))  # staff: as published


# --- the audit log ----------------------------------------------------------------------------------

def test_an_audit_line_per_view_download_and_action(api, settings, store):
    make_job(settings, store)
    api.get("/api/jobs/pd-j1")  # anonymous, public read
    assert api.get("/api/jobs/pd-j1", headers=VIEWER).status_code == 200
    assert api.get("/api/jobs/pd-j1/images", headers=VIEWER).status_code == 200
    assert api.get("/api/jobs/pd-j1/dicom", headers=ADMIN).status_code == 200
    assert api.get("/api/jobs/pd-j1/previews/1.png", headers=VIEWER).status_code == 200
    assert api.post("/api/jobs/pd-j1/retry", headers=TECH).status_code == 409  # done: refused, not recorded
    make_job(settings, store, "q-j1", "q", done=False)
    assert api.post("/api/jobs/q-j1/cancel", headers=TECH).status_code == 200

    lines = audit_lines(settings)
    got = [(e["who"], e["role"], e["action"], e["job"]) for e in lines]
    assert got == [("anonymous", "none", "view", "pd-j1"), ("vera", "viewer", "view", "pd-j1"),
                   ("vera", "viewer", "download-mrd", "pd-j1"), ("root", "admin", "download-dicom", "pd-j1"),
                   ("vera", "viewer", "preview", "pd-j1"), ("tom", "technologist", "cancel", "q-j1")]
    for e in lines:
        assert e["address"] == "testclient"
        at = datetime.fromisoformat(e["at"].replace("Z", "+00:00"))
        assert at.utcoffset().total_seconds() == 0 and abs(time.time() - at.timestamp()) < 60
    path = audit_file(settings.data_dir, datetime.now(UTC))
    assert_no_patient_data(path.read_text(), "the audit log")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.name == f"audit-{datetime.now(UTC):%Y-%m-%d}.jsonl"
    copy = redis.Redis.from_url(settings.redis_url, decode_responses=True).xrange(AUDIT_STREAM)
    assert [m["action"] for _, m in copy][-len(lines):] == [e["action"] for e in lines]


def test_lines_are_only_appended(api, settings, store):
    make_job(settings, store)
    api.get("/api/jobs/pd-j1", headers=VIEWER)
    path = audit_file(settings.data_dir, datetime.now(UTC))
    first = path.read_bytes()
    api.get("/api/jobs/pd-j1/images", headers=VIEWER)
    assert path.read_bytes().startswith(first) and len(audit_lines(settings)) == 2


def test_a_download_is_refused_when_its_audit_line_cannot_be_written(api, settings, store, caplog):
    make_job(settings, store)
    audit = Path(settings.data_dir) / "audit"
    audit.write_text("not a folder")  # the audit folder cannot be made (a read-only folder would not stop root)
    caplog.set_level(logging.ERROR, logger="reconq.api.audit")
    for path in ("/api/jobs/pd-j1/images", "/api/jobs/pd-j1/dicom", "/api/jobs/pd-j1/previews/0.png"):
        r = api.get(path, headers=ADMIN)
        assert r.status_code == 503, path
        assert "audit log" in r.json()["detail"] and "only when its access is recorded" in r.json()["detail"]
        assert r.headers["content-type"].startswith("application/json")  # no image bytes
    assert "audit: cannot write" in caplog.text
    view = api.get("/api/jobs/pd-j1", headers=ADMIN)  # a view goes ahead; its failure is logged as an error
    assert view.status_code == 200 and caplog.text.count("audit: cannot write") == 4


# --- roles for the dashboard ------------------------------------------------------------------------

def test_me_reports_the_role(api):
    assert api.get("/api/auth/me").json() == {"name": "", "staff": False, "role": None, "public_read": True}
    assert api.get("/api/auth/me", headers=VIEWER).json()["role"] == "viewer"
    assert api.get("/api/auth/me", headers=TECH).json()["role"] == "technologist"
    assert api.get("/api/auth/me", headers=ADMIN).json() == {"name": "root", "staff": True, "role": "admin",
                                                             "public_read": True}
    signed = api.post("/api/auth/signin", json={"token": VIEWER_TOKEN})
    assert signed.status_code == 200 and signed.json()["role"] == "viewer"


def test_the_dashboard_hides_actions_from_a_viewer_and_confirms_a_cancel():
    """The JS contract (the browser test is in test_dashboard.py): the job page shows the actions only to a
    technologist or admin, and a cancel asks first."""
    dashboard = Path(__file__).resolve().parents[1] / "api" / "dashboard"
    static = dashboard / "static"
    job_js, common_js = (static / "job.js").read_text(), (static / "common.js").read_text()
    job_html = (dashboard / "job.html").read_text()
    for action in ("retry", "cancel", "priority"):  # hidden until the role is known to allow them
        assert f'<button id="{action}" type="button" data-needs="technologist" hidden>' in job_html
    assert '<form id="retro" class="retro" data-needs="technologist" hidden>' in job_html
    assert 'el.hidden = !ReconQ.may(el.dataset.needs)' in common_js
    assert "window.confirm(" in job_js and 'roles: ["viewer", "technologist", "admin"]' in common_js
    assert "[hidden] { display: none !important; }" in (static / "app.css").read_text()
