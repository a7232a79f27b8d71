"""The dashboard in headless Chromium against the real stack on loopback, as a technologist uses it.

Real Redis, the MRD gateway (TCP), a real ``reconq worker`` process, the API on uvicorn in a thread,
Debian's ``chromium`` driven by Selenium through ``chromedriver``. Screenshots of the jobs page and a
job page are saved under ``test-artifacts/``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import uvicorn

from reconq.api.auth import hash_password
from reconq.core.constants import QUEUE_ORDER
from reconq.core.redisconn import free_port
from reconq.core.settings import Settings
from reconq.core.states import JobState
from reconq.gateway import client
from reconq.recon.simulate import synthetic_scan
from reconq.services import make_api

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PASSWORD = "dashboard test password"
VIEWER_PASSWORD = "dashboard viewer password"
TECH_PASSWORD = "dashboard technologist password"
WAIT_S = 90
#: How the dashboard shows every time: ISO date, 24-hour local time.
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def local_iso(epoch: float) -> str:
    """``epoch`` as the dashboard should show it (the browser runs on this machine, in its time zone)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="browser tests need Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="browser tests need the selenium package")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


class LiveApi:
    """The API on uvicorn in a thread, on a free loopback port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        app = make_api(settings, redis.Redis.from_url(settings.redis_url or "", decode_responses=True))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveApi:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def dash_settings(e2e_settings: Settings) -> Settings:
    """The stack's settings plus staff sign-in; anonymous viewers may look (identifiers masked)."""
    return e2e_settings.model_copy(update={"staff_passwords": {
        "alice": hash_password(PASSWORD), "vera": {"hash": hash_password(VIEWER_PASSWORD), "role": "viewer"},
        "tess": {"hash": hash_password(TECH_PASSWORD), "role": "technologist"}},
        "dashboard_public_read": True})


@pytest.fixture(scope="module")
def live_api(dash_settings: Settings) -> Iterator[LiveApi]:
    api = LiveApi(dash_settings).start()
    yield api
    api.stop()


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    profile = tempfile.mkdtemp(prefix="reconq-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1500,1100", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: webdriver.Chrome, condition, what: str, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(condition, message=f"waiting for {what}")


def screenshot(driver: webdriver.Chrome, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))


def row(driver: webdriver.Chrome, job_id: str) -> list[str] | None:
    """The texts of the job's table cells, or None (read in one go: rows are redrawn as events arrive)."""
    return driver.execute_script(
        "const r = document.querySelector(`tr[data-id='${arguments[0]}']`);"
        "return r ? [...r.querySelectorAll('td')].map((c) => c.innerText) : null", job_id)


def options(driver: webdriver.Chrome, select: str) -> list[str]:
    """The texts of a select's options."""
    return driver.execute_script(
        "return [...document.querySelector(arguments[0]).options].map((o) => o.text)", select)


def sign_in(driver: webdriver.Chrome, name: str = "alice", password: str = PASSWORD) -> None:
    form = wait_for(driver, lambda d: d.find_elements(By.ID, "signin") and d.find_element(By.ID, "signin"),
                    "the sign-in form")  # a page just asked for may not be there yet
    form.find_element(By.NAME, "name").send_keys(name)
    form.find_element(By.NAME, "password").send_keys(password)
    form.find_element(By.CSS_SELECTOR, "button").click()
    wait_for(driver, lambda d: d.find_elements(By.ID, "who"), "signed in")


def test_scan_appears_progresses_turns_done_and_shows_its_images(gateway, worker, live_api, browser):
    host, port = gateway
    browser.get(live_api.url + "/")
    wait_for(browser, lambda d: d.execute_script("return !!ReconQ.source && ReconQ.source.readyState === 1"),
             "the event stream")
    # Record every width the job's progress bar takes, as the live events move it (no reloads).
    browser.execute_script("""
        window.widths = []; window.reloads = 0;
        new MutationObserver(() => document.querySelectorAll('tr[data-id$="-j1"] .fill').forEach(
            (f) => window.widths.push([f.closest('tr').dataset.id, parseFloat(f.style.width)]))
        ).observe(document.querySelector('#jobs tbody'), {subtree: true, childList: true, attributes: true});
    """)
    # Big enough, with Walsh coil combination, that the recon takes seconds and its progress can be seen.
    scan = synthetic_scan(matrix=(192, 192), ncoil=16, nslices=8, protocol="dash_t1", patient_id="DASH4711",
                          patient_name="Dashwood^Erika")
    reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian",
                             params={"combine": "walsh"})
    job_id = reply.job_id()
    assert job_id, reply.texts

    wait_for(browser, lambda d: row(d, job_id) is not None, "the new job in the table")
    assert re.fullmatch(r"P-[0-9a-f]{6}", row(browser, job_id)[1])  # the patient ID, masked
    wait_for(browser, lambda d: row(d, job_id)[4].lower() == "done", "the job to turn done")
    widths = [w for j, w in browser.execute_script("return window.widths") if j == job_id]
    assert any(0 < w < 100 for w in widths), f"the progress bar never showed a value between 0 and 100: {widths}"
    assert widths[-1] == 100
    cells = row(browser, job_id)
    assert cells[2] == "dash_t1" and cells[10] and cells[11] == "1" and cells[9]  # protocol, GPU, attempts, run time
    assert all(ISO_TIME.fullmatch(c) for c in cells[6:9]), cells  # queued, started, finished: ISO, 24 h
    job = browser.execute_async_script(
        f"fetch('/api/jobs/{job_id}').then((r) => r.json()).then(arguments[arguments.length - 1])")
    assert cells[6] == local_iso(job["queued_at"]) and cells[8] == local_iso(job["finished_at"])
    assert "Dashwood" not in browser.page_source and "DASH4711" not in browser.page_source  # public read
    assert browser.find_element(By.CSS_SELECTOR, '#queues .depth[data-queue="routine"]').text == "0"
    browser.find_element(By.ID, "tab-jobs").click()  # the exams of the day come first; the table is a tab
    screenshot(browser, "dashboard-jobs.png")

    browser.find_element(By.LINK_TEXT, job_id).click()
    wait_for(browser, lambda d: "storing" in d.find_element(By.ID, "stages").text, "the stages")
    # public read: no previews, parameters or log, and no actions
    assert not browser.find_elements(By.CSS_SELECTOR, "img.preview")
    assert "Sign in as staff to see the previews" in browser.find_element(By.ID, "previews").text
    assert "Sign in as staff" in browser.find_element(By.ID, "params").text
    assert "Sign in as staff" in browser.find_element(By.ID, "log").text
    assert "Sign in as staff to download" in browser.find_element(By.ID, "downloads").text
    assert not browser.find_element(By.ID, "retry").is_displayed()
    facts = browser.find_element(By.ID, "facts").text
    assert f"Created {local_iso(job['created_at'])}" in facts and f"Finished {local_iso(job['finished_at'])}" in facts
    assert "Dashwood" not in browser.page_source and "DASH4711" not in browser.page_source
    sign_in(browser)
    wait_for(browser, lambda d: d.find_elements(By.ID, "dl-dicom"), "the download links")
    wait_for(browser, lambda d: d.execute_script(
        "const i = document.querySelectorAll('img.preview');"
        "return i.length > 0 && [...i].every((x) => x.complete && x.naturalWidth > 0)"), "the previews")
    assert len(browser.find_elements(By.CSS_SELECTOR, "img.preview")) == 4  # a few of the 8 slices
    assert browser.find_element(By.CSS_SELECTOR, "#facts .patient").text == "DASH4711"
    assert browser.find_element(By.CSS_SELECTOR, "#facts .patient-name").text == "Dashwood, Erika"
    screenshot(browser, "dashboard-job.png")


def test_failed_job_shows_its_error_and_staff_can_retry_it(gateway, worker, live_api, browser):
    host, port = gateway
    scan = synthetic_scan(matrix=(32, 32), ncoil=2, protocol="dash_broken", patient_id="BROKEN2")
    scan.header.encoding[0].trajectory = type(scan.header.encoding[0].trajectory)("radial")
    job_id = client.send_scan(host, port, scan.header, scan.acquisitions, config="cartesian").job_id()
    assert job_id

    browser.get(f"{live_api.url}/jobs/{job_id}")
    error = wait_for(browser, lambda d: d.find_element(By.ID, "error").is_displayed()
                     and d.find_element(By.ID, "error"), "the error")
    assert error.text.startswith("Error: ") and len(error.text) > 10
    assert browser.find_element(By.ID, "state").text.lower() == "failed"
    # not signed in: no actions offered (the server refuses them too)
    assert not browser.find_element(By.ID, "retry").is_displayed()
    assert not browser.find_element(By.ID, "retro").is_displayed()
    assert "Sign in as a technologist" in browser.find_element(By.ID, "act-hint").text
    assert "nothing" in browser.find_element(By.ID, "audit").text

    sign_in(browser)
    wait_for(browser, lambda d: d.find_element(By.ID, "retry").is_displayed(), "the actions")
    # the buttons and choices follow the server's vocabulary: a failed job may be retried, not cancelled
    assert browser.find_element(By.ID, "retry").is_enabled() and not browser.find_element(By.ID, "cancel").is_enabled()
    assert options(browser, "#queue") == [q.value for q in QUEUE_ORDER]
    assert browser.find_element(By.ID, "retro-queue").get_attribute("value") == QUEUE_ORDER[-1].value
    screenshot(browser, "dashboard-failed-job.png")
    msg = browser.find_element(By.ID, "action-msg")
    browser.find_element(By.ID, "retry").click()
    wait_for(browser, lambda d: "Retry: done" in msg.text, "the retry")
    wait_for(browser, lambda d: "alice" in d.find_element(By.ID, "audit").text, "the action on the job")
    assert "retry" in browser.find_element(By.ID, "audit").text
    wait_for(browser, lambda d: d.execute_script(
        "return window.reconqJob.state === 'failed' && window.reconqJob.attempts === 2"), "the second attempt")


def test_connection_lost_is_shown(dash_settings, browser):
    api = LiveApi(dash_settings).start()
    try:
        browser.get(api.url + "/")
        wait_for(browser, lambda d: d.execute_script("return !!ReconQ.source && ReconQ.source.readyState === 1"),
                 "the event stream")
        assert not browser.find_element(By.ID, "conn").is_displayed()
    finally:
        api.stop()
    conn = wait_for(browser, lambda d: d.find_element(By.ID, "conn").is_displayed() and d.find_element(By.ID, "conn"),
                    "the 'connection lost' sign", timeout=30)
    assert "Connection to the server lost" in conn.text


def test_filters_narrow_the_table(gateway, live_api, browser, e2e_settings):
    from reconq.core.jobs import Job, JobStore

    store = JobStore(redis.Redis.from_url(e2e_settings.redis_url or "", decode_responses=True))
    for i, proto in enumerate(["filter_flair", "filter_dwi", "filter_flair_cor"]):
        store.create(Job(id=f"filt-{i}", scan_id=f"filt{i}", pipeline="cartesian", protocol=proto,
                         created_at=time.time() - i))
    browser.get(live_api.url + "/#jobs")
    wait_for(browser, lambda d: row(d, "filt-0") is not None, "the jobs")
    wait_for(browser, lambda d: len(options(d, "#filters select[name=state]")) > 1, "the state filter's choices")
    assert options(browser, "#filters select[name=state]") == ["any", *(s.value for s in JobState)]
    form = browser.find_element(By.ID, "filters")
    form.find_element(By.NAME, "protocol").send_keys("FLAIR")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(browser, lambda d: row(d, "filt-1") is None, "the filtered table")
    ids = [r.get_attribute("data-id") for r in browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr[data-id]")]
    assert ids == ["filt-0", "filt-2"]
    # dates are typed as ISO dates, whatever the browser's locale (a date picker would show its order)
    since = form.find_element(By.NAME, "since")
    assert since.get_attribute("placeholder") == "YYYY-MM-DD"
    since.send_keys("12/01/2026")
    assert not browser.execute_script("return arguments[0].validity.valid", since)
    since.clear()
    since.send_keys(time.strftime("%Y-%m-%d", time.localtime(time.time() + 86400)))  # tomorrow: none yet
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(browser, lambda d: row(d, "filt-0") is None, "the table filtered by date")
    assert "No jobs" in browser.find_element(By.CSS_SELECTOR, "#jobs tbody").text


def series(driver: webdriver.Chrome, job_id: str) -> dict[str, str] | None:
    """The texts of a series' row on the exams view and of its exam's heading, or None (read in one go)."""
    return driver.execute_script(
        "const r = document.querySelector(`#exams tr[data-job='${arguments[0]}']`);"
        "if (!r) return null;"
        "const t = (sel) => r.querySelector(sel).innerText.trim();"
        "return {state: t('.state').toLowerCase(), finish: t('.finish'), retrieval: t('.retrieval'),"
        "        link: r.querySelector('.job a').getAttribute('href'),"
        "        exam: r.closest('.exam').querySelector('.exam-head').innerText}", job_id)


def test_exams_of_the_day_say_when_to_retrieve(live_api, browser, e2e_settings):
    from reconq.core.jobs import Job, JobStore

    store = JobStore(redis.Redis.from_url(e2e_settings.redis_url or "", decode_responses=True))
    t0 = time.time()

    def job(job_id: str, protocol: str, patient_id: str = "EXAM0042", study_uid: str = "1.2.826.0.1.4242") -> str:
        assert store.create(Job(id=job_id, scan_id=job_id, pipeline="cartesian", protocol=protocol,
                                patient_id=patient_id, study_uid=study_uid, created_at=time.time(),
                                queued_at=time.time()))
        return job_id

    def own_result(job_id: str) -> str:
        """A result file of the job's run where the worker writes it (derived from its ids); its name in Redis."""
        import ismrmrd
        import numpy as np

        from reconq.core.results import result_file, write_images
        from reconq.core.storage import ScanStore

        scans = ScanStore(e2e_settings.data_dir)
        path = result_file(scans, store.get(job_id))
        write_images(path, [ismrmrd.Image.from_array(np.zeros((8, 8), np.uint16))])
        return scans.stored(path)

    done = job("exam-t1", "exam_t1")
    assert store.set_state(done, JobState.RUNNING, progress=0.5, attempts=1)
    assert store.set_state(done, JobState.DONE, progress=1.0, stage="done", result_path=own_result(done))
    queued = job("exam-t2", "exam_t2")
    assert store.update(queued, runtime_estimate_s=120.0)  # no run-time history for this protocol: this is used
    failed = job("exam-dwi", "exam_dwi")
    assert store.set_state(failed, JobState.FAILED, error="coil 3 saturated")
    anonymous = job("exam-anon", "exam_anon", patient_id="", study_uid="")

    browser.get(live_api.url + "/")  # the exams of the day are the first view
    wait_for(browser, lambda d: all(series(d, j) for j in (done, queued, failed, anonymous)), "the exams' series")
    assert browser.find_element(By.ID, "view-exams").is_displayed()
    assert not browser.find_element(By.ID, "view-jobs").is_displayed()

    exams = browser.execute_async_script(
        "fetch('/api/exams').then((r) => r.json()).then(arguments[arguments.length - 1])")
    expected = next(s for x in exams["exams"] for s in x["series"] if s["job_id"] == queued)["expected_finish"]
    assert expected is not None and expected >= t0 + 120 - 2, expected
    row_queued = series(browser, queued)
    assert row_queued["state"] == "queued"
    shown = ISO_TIME.match(row_queued["finish"])  # ISO date and 24-hour local time, to the second
    assert shown, row_queued["finish"]
    assert abs(time.mktime(time.strptime(shown.group(), "%Y-%m-%d %H:%M:%S")) - expected) < 5  # it moves with the clock
    assert ISO_TIME.search(row_queued["exam"].split("first series ")[1]), row_queued["exam"]
    assert row_queued["retrieval"] == "not yet" and row_queued["link"] == f"/jobs/{queued}"
    # one card per exam; public read: the patient ID and study UID masked (keyed hash prefixes)
    assert re.search(r"P-[0-9a-f]{6}", row_queued["exam"]) and re.search(r"study S-[0-9a-f]{6}", row_queued["exam"])
    assert "EXAM0042" not in row_queued["exam"] and "1.2.826.0.1.4242" not in row_queued["exam"]
    assert "retrieve after" in row_queued["exam"]

    assert series(browser, done)["retrieval"] == "ready to retrieve"
    assert series(browser, done)["finish"] == ""
    assert series(browser, failed)["retrieval"] == "coil 3 saturated"
    assert "no patient ID / study UID: retrieve by job id" in series(browser, anonymous)["exam"]
    screenshot(browser, "dashboard-exams.png")

    # the card follows the live events: the queued series runs and is done, and the exam's verdict with it
    assert store.set_state(queued, JobState.RUNNING, progress=0.0, attempts=1)
    assert store.set_state(queued, JobState.DONE, progress=1.0, result_path=own_result(queued))
    wait_for(browser, lambda d: series(d, queued)["retrieval"] == "ready to retrieve", "the series to be ready")
    assert "retrieve after" not in series(browser, queued)["exam"]

    browser.find_element(By.ID, "tab-jobs").click()  # all jobs stay one click away
    wait_for(browser, lambda d: d.find_element(By.ID, "jobs").is_displayed(), "the jobs table")
    assert not browser.find_element(By.ID, "view-exams").is_displayed()


def test_an_alignsense_job_shows_its_motion_table_and_a_sequential_scan_its_warning(gateway, worker, live_api,
                                                                                   browser, e2e_settings):
    """Two ``alignsense`` scans through the gateway and a worker: one with ``idx.segment`` shots in random
    order (its job page shows the motion per shot), one acquired sequentially (the warning, on the page
    and to the retrieval scan as WRN)."""
    import numpy as np

    from reconq.core.jobs import JobStore
    from reconq.recon.phantoms import Phantom
    from reconq.recon.shotsim import moving_scan

    host, port = gateway
    phantom = Phantom.default(2, ncoil=6, seed=1).resized(0.7).blurred(1.5, (48, 48))
    motion = np.array([[0, 0, 0], [1.0, -1.5, 2.0], [-1.0, 1.0, -2.0], [0.5, 0.5, 1.0]]) - [0.125, 0.0, 0.25]
    store = JobStore(redis.Redis.from_url(e2e_settings.redis_url or "", decode_responses=True))
    jobs = {}
    for order in ("random", "sequential"):
        scan = moving_scan(phantom, (48, 48), motion, order=order, protocol=f"dash_align_{order}",
                           patient_id=f"ALIGN{order[:3].upper()}")
        reply = client.send_scan(host, port, scan.header, scan.acquisitions, config="alignsense")
        assert reply.job_id(), reply.texts
        back = client.retrieve(host, port, scan.header)
        assert back.closed and len(back.images) == 1, back.texts
        jobs[order] = (reply.job_id(), back)
    job_id, back = jobs["random"]
    assert not [t for t in back.texts if t.startswith("WRN")], back.texts
    job = store.get(job_id)
    assert job is not None and len(job.report["motion"]["rows"]) == 4 and not job.warnings

    browser.get(f"{live_api.url}/jobs/{job_id}")
    wait_for(browser, lambda d: d.find_elements(By.ID, "signin"), "the sign-in form")
    sign_in(browser)  # the recon's report is patient data: staff only
    table = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#report table.report"), "the motion table")
    cells = browser.execute_script(
        "return [...arguments[0].querySelectorAll('tbody tr')].map((r) => [...r.cells].map((c) => c.innerText))",
        table[0])
    assert len(cells) == 4 and [c[1] for c in cells] == ["0", "1", "2", "3"]
    headers = [th.text for th in table[0].find_elements(By.CSS_SELECTOR, "thead th")]
    assert "read mm" in headers and "slice °" in headers
    assert browser.find_element(By.ID, "warnings").get_attribute("hidden") is not None
    screenshot(browser, "alignsense-job.png")

    seq_id, seq_back = jobs["sequential"]
    assert any(t.startswith("WRN") and "motion not corrected" in t for t in seq_back.texts), seq_back.texts
    browser.get(f"{live_api.url}/jobs/{seq_id}")
    warning = wait_for(browser, lambda d: [w for w in d.find_elements(By.CSS_SELECTOR, "#warnings li")
                                          if "motion not corrected" in w.text], "the warning")
    assert "sequential" in warning[0].text


ACTIONS = ("retry", "cancel", "priority-choice", "priority", "retro")


def shown_actions(driver: webdriver.Chrome) -> list[str]:
    """The job page's actions a user can see (each hidden, not merely disabled, where the role may not)."""
    return [a for a in ACTIONS if driver.find_element(By.ID, a).is_displayed()]


def test_actions_are_shown_only_to_roles_that_may_use_them_and_a_cancel_asks_first(live_api, browser, e2e_settings):
    """Roles in the dashboard: a public reader and a viewer get no retry/cancel/move/retro (hidden); a
    technologist gets them, and a cancel asks first in a real dialog naming the job and its protocol:
    dismissed, nothing happens; accepted, the job is cancelled."""
    from reconq.core.jobs import Job, JobStore

    store = JobStore(redis.Redis.from_url(e2e_settings.redis_url or "", decode_responses=True))
    job_id = f"roles-{time.time_ns()}-j1"
    store.create(Job(id=job_id, scan_id=job_id[:-3], pipeline="cartesian", protocol="dash_roles"))
    browser.get(f"{live_api.url}/jobs/{job_id}")
    wait_for(browser, lambda d: d.find_element(By.ID, "state").text.lower() == "queued", "the job")
    assert shown_actions(browser) == []  # public read
    assert all(browser.find_element(By.ID, a).get_attribute("hidden") is not None for a in ACTIONS)
    assert "Sign in as a technologist" in browser.find_element(By.ID, "act-hint").text

    sign_in(browser, "vera", VIEWER_PASSWORD)
    assert "(viewer)" in browser.find_element(By.ID, "role").text
    wait_for(browser, lambda d: "may only view" in d.find_element(By.ID, "act-hint").text, "the viewer's hint")
    assert shown_actions(browser) == []
    browser.find_element(By.ID, "signout").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "signin"), "signed out")
    assert shown_actions(browser) == []

    sign_in(browser, "tess", TECH_PASSWORD)
    wait_for(browser, lambda d: d.find_element(By.ID, "cancel").is_displayed(), "the actions")
    assert shown_actions(browser) == list(ACTIONS)
    assert not browser.find_element(By.ID, "act-hint").is_displayed()
    browser.find_element(By.ID, "cancel").click()
    alert = wait_for(browser, lambda d: d.switch_to.alert, "the confirmation", timeout=10)
    assert job_id in alert.text and "dash_roles" in alert.text and alert.text.startswith("Cancel job"), alert.text
    alert.dismiss()
    time.sleep(1.0)
    assert store.get(job_id).state is JobState.QUEUED  # dismissed: not cancelled
    assert browser.find_element(By.ID, "action-msg").text == ""
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda d: d.switch_to.alert, "the confirmation again", timeout=10).accept()
    wait_for(browser, lambda d: store.get(job_id).state is JobState.CANCELLED, "the cancel")
    wait_for(browser, lambda d: "Cancel: done" in d.find_element(By.ID, "action-msg").text, "the cancel's answer")
    assert "tess" in browser.find_element(By.ID, "audit").text


def test_patient_names_for_staff_never_for_public_readers(live_api, browser, e2e_settings):
    """The exams, the jobs table and the job page show staff (any role) the patient's name and ID; a
    public reader sees the masked ID only: the name is nowhere in the page's source nor in the JSON."""
    from reconq.core.jobs import Job, JobStore
    from reconq.core.storage import ScanRecord, ScanState, ScanStore
    from reconq.recon.simulate import write_mrd

    store = JobStore(redis.Redis.from_url(e2e_settings.redis_url or "", decode_responses=True))
    scans = ScanStore(e2e_settings.data_dir)
    scan_id = f"names{time.time_ns()}"
    scans.create(ScanRecord(scan_id=scan_id, state=ScanState.COMPLETE, patient_id="NAME8642", protocol="dash_name"))
    write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2, patient_id="NAME8642", patient_name="Quenby^Marguerite^Ann",
                             study_uid="1.2.826.0.1.8642", protocol="dash_name"), scans.raw_path(scan_id))
    job_id = f"{scan_id}-j1"
    now = time.time()
    store.create(Job(id=job_id, scan_id=scan_id, pipeline="cartesian", protocol="dash_name", patient_id="NAME8642",
                     study_uid="1.2.826.0.1.8642", created_at=now, queued_at=now))
    secrets = ("Quenby", "Marguerite", "NAME8642", "1.2.826.0.1.8642")

    def fetched(path: str) -> str:
        return browser.execute_async_script(
            f"fetch('{path}').then((r) => r.text()).then(arguments[arguments.length - 1])")

    def card() -> str | None:
        return series(browser, job_id) and series(browser, job_id)["exam"]

    browser.get(live_api.url + "/")
    wait_for(browser, lambda d: card(), "the exam")
    assert re.search(r"P-[0-9a-f]{6}", card())
    browser.find_element(By.ID, "tab-jobs").click()
    wait_for(browser, lambda d: row(d, job_id) is not None, "the job in the table")
    assert re.fullmatch(r"P-[0-9a-f]{6}", row(browser, job_id)[1])
    for text, where in ((browser.page_source, "the page"), (fetched("/api/jobs"), "/api/jobs"),
                        (fetched("/api/exams"), "/api/exams"), (fetched(f"/api/jobs/{job_id}"), "the job")):
        for secret in secrets:
            assert secret not in text, (secret, where)
    browser.get(f"{live_api.url}/jobs/{job_id}")
    wait_for(browser, lambda d: d.find_element(By.ID, "state").text.lower() == "queued", "the job page")
    assert not browser.find_elements(By.CSS_SELECTOR, "#facts .patient-name")
    assert all(secret not in browser.page_source for secret in secrets)

    sign_in(browser, "vera", VIEWER_PASSWORD)  # a viewer: the lowest role sees names
    name = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#facts .patient-name"), "the name")[0]
    assert name.text == "Quenby, Marguerite Ann"
    assert browser.find_element(By.CSS_SELECTOR, "#facts .patient").text == "NAME8642"
    browser.get(live_api.url + "/")
    wait_for(browser, lambda d: card() and "Quenby" in card(), "the name on the exam")
    assert "Quenby, Marguerite Ann NAME8642" in card() and "study 1.2.826.0.1.8642" in card()
    browser.find_element(By.ID, "tab-jobs").click()
    wait_for(browser, lambda d: row(d, job_id) is not None, "the job in the table")
    assert row(browser, job_id)[1] == "Quenby, Marguerite Ann NAME8642"
    assert '"patient_name":"Quenby^Marguerite^Ann"' in fetched("/api/jobs")


DISK_TEXT = re.compile(r"Disk: [\d.]+ [kMGT]?B free of [\d.]+ [kMGT]?B; raw scans [\d.]+ [kMGT]?B \((\d+)\), "
                       r"results [\d.]+ [kMGT]?B \((\d+)\)")


def test_disk_use_is_shown_to_staff_with_a_warning_when_low(live_api, dash_settings, browser):
    browser.get(live_api.url + "/")
    wait_for(browser, lambda d: d.find_element(By.ID, "signin"), "the page")
    time.sleep(0.5)
    assert not browser.find_element(By.ID, "disk-panel").is_displayed()  # public read: no disk panel
    assert "Disk:" not in browser.page_source
    sign_in(browser, "vera", VIEWER_PASSWORD)
    disk = wait_for(browser, lambda d: DISK_TEXT.search(d.find_element(By.ID, "disk").text)
                    and d.find_element(By.ID, "disk"), "the disk panel")
    answer = browser.execute_async_script(
        "fetch('/api/disk').then((r) => r.json()).then(arguments[arguments.length - 1])")
    counts = DISK_TEXT.search(disk.text).groups()
    assert counts == (str(answer["raw"]["count"]), str(answer["results"]["count"]))  # one walk, kept a minute
    assert "low" not in disk.get_attribute("class") and "Low:" not in disk.text  # min_free_bytes 0

    tight = LiveApi(dash_settings.model_copy(update={"min_free_bytes": answer["total_bytes"] + 1})).start()
    try:
        browser.find_element(By.ID, "signout").click()  # cookies are per host, not port: sign in afresh there
        wait_for(browser, lambda d: d.find_elements(By.ID, "signin"), "signed out")
        browser.get(tight.url + "/")
        sign_in(browser, "vera", VIEWER_PASSWORD)
        low = wait_for(browser, lambda d: "Low:" in d.find_element(By.ID, "disk").text
                       and d.find_element(By.ID, "disk"), "the low-space warning")
        assert "low" in low.get_attribute("class").split()
        assert "the gateway refuses new scans" in low.text
        screenshot(browser, "dashboard-disk-low.png")
    finally:
        tight.stop()
