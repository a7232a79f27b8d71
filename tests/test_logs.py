"""Log lines carry the job they belong to (a contextvar filter), as text or as JSON (RECONQ_LOG_FORMAT), and
a failed recon ends its Celery task as FAILURE, acked once (a real worker)."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import redis
from conftest import start_worker, stop_process

from reconq.core.celeryapp import make_celery
from reconq.core.jobs import Job, JobStore
from reconq.core.logs import JobContextFilter, configure_logging, install, job_context
from reconq.core.sender import TaskSender
from reconq.core.settings import SettingsError, load_settings
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.recon.pipeline import Pipeline, ProgressFn, warn
from reconq.recon.simulate import synthetic_scan, write_mrd
from reconq.scheduler.submit import enqueue


def record(msg: str = "hello %s", *args: object, name: str = "reconq.test") -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args or ("world",), None)


def formatted(log_format: str, rec: logging.LogRecord) -> str:
    handler = logging.StreamHandler(io.StringIO())
    install(handler, log_format)
    for f in handler.filters:
        f.filter(rec)
    return handler.format(rec)


def test_a_line_outside_a_job_has_no_job_and_inside_one_has_it():
    outside = formatted("json", record())
    assert json.loads(outside)["job_id"] is None and " [job " not in formatted("text", record())
    with job_context("j-1", "s-1", "cpu-1@host"):
        line = json.loads(formatted("json", record()))
        text = formatted("text", record())
    assert line["job_id"] == "j-1" and line["scan_id"] == "s-1" and line["worker"] == "cpu-1@host"
    assert line["message"] == "hello world" and line["level"] == "INFO" and line["logger"] == "reconq.test"
    assert line["time"].endswith("+00:00") and "T" in line["time"]  # ISO 8601, UTC
    assert set(line) == {"time", "level", "logger", "job_id", "scan_id", "worker", "message"}
    assert "reconq.test: [job j-1] hello world" in text
    after = record()
    JobContextFilter().filter(after)
    assert after.job_id is None  # reset when the block ends


def test_the_log_format_setting_takes_text_or_json_only():
    assert load_settings().log_format == "text"
    assert load_settings(log_format="json").log_format == "json"
    with pytest.raises((SettingsError, ValueError)):
        load_settings(log_format="xml")


@pytest.fixture
def root_capture() -> Iterator[io.StringIO]:
    """The root logger with one handler on a buffer, configured as an entry point configures it (JSON)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    out = io.StringIO()
    root.handlers = [logging.StreamHandler(out)]
    configure_logging("json", logging.INFO)
    try:
        yield out
    finally:
        root.handlers = saved
        root.setLevel(level)


class ChattyPipeline(Pipeline):
    """Logs a line of its own and warns, as a plugin would, then fails."""

    name = "test-chatty"

    def run(self, scan: Any, params: Mapping[str, Any], progress: ProgressFn) -> list[Any]:
        logging.getLogger("reconq_plugin.chatty").info("plugin line for this scan")
        warn(progress, "a warning from the plugin")
        from reconq.recon.errors import ReconError

        raise ReconError("chatty: done talking")


def test_a_pipeline_line_during_a_job_carries_the_job_id_in_json(redis_server, tmp_path, root_capture):
    from reconq.recon.registry import register
    from reconq.scheduler.inventory import make_inventory
    from reconq.workers.slot import cpu_slot
    from reconq.workers.tasks import JobRunner

    url = redis_server.url.rsplit("/", 1)[0] + "/11"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    settings = load_settings(data_dir=tmp_path / "data", redis_url=url, log_format="json")
    raw = ScanStore(settings.data_dir).raw_path("chat")
    raw.parent.mkdir(parents=True)
    write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2), raw)
    register(ChattyPipeline())
    store = JobStore(client)
    store.create(Job(id="chat-j1", scan_id="chat", pipeline="test-chatty"))
    runner = JobRunner(settings, store, "w-logs", cpu_slot(make_inventory(settings)))
    assert runner.run("chat-j1") == JobState.FAILED.value
    logging.getLogger("reconq.test").info("after the job")
    lines = [json.loads(line) for line in root_capture.getvalue().splitlines()]
    plugin = [x for x in lines if x["logger"] == "reconq_plugin.chatty"]
    assert plugin and plugin[0]["message"] == "plugin line for this scan"
    assert (plugin[0]["job_id"], plugin[0]["scan_id"], plugin[0]["worker"]) == ("chat-j1", "chat", "w-logs")
    warned = [x for x in lines if x["logger"] == "reconq.recon.pipeline"]
    assert warned and warned[0]["job_id"] == "chat-j1" and warned[0]["level"] == "WARNING"
    assert all(x["job_id"] == "chat-j1" for x in lines if x["logger"].startswith("reconq.workers"))
    assert lines[-1]["message"] == "after the job" and lines[-1]["job_id"] is None


def test_a_failed_recon_ends_its_task_as_failure_once_not_redelivered(redis_server, tmp_path):
    """A real worker, RECONQ_LOG_FORMAT=json: a failing `sleep` job ends `failed` after one run, Celery logs
    the task as failed (ReconFailed), the message is acked (nothing left in the queue, no second delivery),
    and the worker's lines during the job are JSON carrying its job id."""
    url = redis_server.url.rsplit("/", 1)[0] + "/12"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    settings = load_settings(data_dir=tmp_path / "data", redis_url=url, enable_test_pipelines=True,
                             log_format="json")
    raw = ScanStore(settings.data_dir).raw_path("bad")
    raw.parent.mkdir(parents=True)
    write_mrd(synthetic_scan(matrix=(16, 16), ncoil=2), raw)
    log_path = tmp_path / "worker.log"
    worker = start_worker(settings, log_path)
    store = JobStore(client)
    try:
        job = Job(id="bad-j1", scan_id="bad", pipeline="sleep", params={"fail": True, "memory_gb": 1})
        store.create(job)
        enqueue(store, TaskSender(make_celery(settings)), job)
        deadline = time.monotonic() + 40
        while not (done := store.get(job.id)).state.finished and time.monotonic() < deadline:
            time.sleep(0.2)
        while b"ReconFailed" not in log_path.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)  # a redelivery, were there one, would come now (the message is acked or requeued at once)
        # the broker's queues (kombu: a list a queue; ReconQ's own keys start reconq:) and its unacked set
        queued = {k: client.llen(k) for k in client.keys("*") if client.type(k) == "list"
                  and not k.startswith("reconq:")}
        unacked = client.hlen("unacked")
    finally:
        stop_process(worker)
    text = log_path.read_text(errors="replace")
    assert done.state is JobState.FAILED and "sleep: failing as asked" in done.error, (done.state, text)
    assert done.attempts == 1, store.log_lines(job.id)
    lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    failed = [x for x in lines if "raised expected: ReconFailed" in x["message"]]
    assert len(failed) == 1, text  # the task ended FAILURE (Flower, celery-exporter), once
    assert "Traceback" not in text
    runs = [x for x in lines if "running pipeline sleep" in x["message"]]
    assert len(runs) == 1 and runs[0]["job_id"] == "bad-j1" and runs[0]["scan_id"] == "bad"
    assert not any(queued.values()) and unacked == 0, (queued, unacked)
