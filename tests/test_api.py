"""The HTTP API on a real Redis: listing, one job, its images, refusals with clear messages."""

from __future__ import annotations

import ismrmrd
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from gateway.api import make_api
from reconq.constants import JobState
from reconq.jobs import Job
from workers.results import read_images, write_images


@pytest.fixture
def api(settings):
    return TestClient(make_api(settings, redis.Redis.from_url(settings.redis_url, decode_responses=True)))


def test_jobs_list_one_job_and_images(api, store, tmp_path):
    for i in range(3):
        store.create(Job(id=f"j{i}", scan_id=f"s{i}", pipeline="cartesian", created_at=100.0 + i,
                         protocol="t1", patient_id="SECRET"))
    image = ismrmrd.Image.from_array(np.arange(12, dtype=np.uint16).reshape(3, 4))
    result = tmp_path / "r.h5"
    write_images(result, [image])
    store.set_state("j1", JobState.DONE, result_path=str(result), progress=1.0)

    page = api.get("/api/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and [j["id"] for j in page["jobs"]] == ["j2", "j1"]
    assert "patient_id" not in page["jobs"][0]  # patient identifiers are not listed
    done = api.get("/api/jobs", params={"state": "done"}).json()
    assert [j["id"] for j in done["jobs"]] == ["j1"] and done["jobs"][0]["has_images"]

    one = api.get("/api/jobs/j1").json()
    assert one["state"] == "done" and one["progress"] == 1.0 and one["finished_at"] is not None

    got = api.get("/api/jobs/j1/images")
    assert got.status_code == 200 and got.headers["content-type"] == "application/x-hdf5"
    downloaded = tmp_path / "d.h5"
    downloaded.write_bytes(got.content)
    assert np.array_equal(read_images(downloaded)[0].data, image.data)


def test_refusals_say_what_is_wrong(api, store):
    store.create(Job(id="q1", scan_id="s", pipeline="cartesian"))
    assert api.get("/api/jobs/nope").status_code == 404
    assert "no job 'nope'" in api.get("/api/jobs/nope").json()["detail"]
    r = api.get("/api/jobs/q1/images")
    assert r.status_code == 409 and "has no images (state queued)" in r.json()["detail"]
    assert api.get("/api/jobs", params={"state": "bogus"}).status_code == 422
    assert api.get("/api/jobs", params={"limit": 0}).status_code == 422


def test_health_reports_redis(api):
    assert api.get("/api/health").json() == {"status": "ok", "redis": True}
