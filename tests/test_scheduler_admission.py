"""Admission scripts, estimates and the inventory, on a real Redis (no workers)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import pytest
import redis

from reconq.core.constants import GPU_RESERVATION_ENDS, WORKER_HEARTBEAT
from reconq.core.jobs import Job, JobStore
from reconq.core.states import JobState
from reconq.core.storage import ScanStore
from reconq.recon.pipeline import Pipeline
from reconq.recon.registry import get_pipeline
from reconq.recon.simulate import synthetic_scan
from reconq.scheduler.admission import Admission, Verdict
from reconq.scheduler.estimate import (
    CONTEXT_BYTES,
    GB,
    HISTORY_KEPT,
    EstimateError,
    default_estimate,
    estimate_bytes,
    estimate_seconds,
    history_seconds,
    record_runtime,
)
from reconq.scheduler.inventory import NoGpuInventory, SimulatedInventory, make_inventory
from reconq.scheduler.placement import Estimate, estimate_job
from reconq.scheduler.routing import waiting_score


@pytest.fixture
def client(redis_db: str) -> redis.Redis:
    return redis.Redis.from_url(redis_db, decode_responses=True)


def alive(client: redis.Redis, *workers: str) -> None:
    for w in workers:
        client.set(WORKER_HEARTBEAT + w, "{}", px=60_000)


def gpus(adm: Admission, **sizes_gb: float) -> None:
    for gpu, size in sizes_gb.items():
        adm.register_gpu(gpu, int(size * GB), int(size * GB), json.dumps({}))


def queued(store: JobStore, job_id: str, queue: str = "routine", at: float = 1000.0) -> float:
    store.create(Job(id=job_id, scan_id="s", pipeline="sleep", queue=queue, queued_at=at))
    return waiting_score(queue, at)


def test_reservations_never_exceed_capacity_and_release(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, g0=24)
    alive(client, "w1", "w2")
    a, b = queued(store, "a", at=1.0), queued(store, "b", at=2.0)
    assert adm.admit("g0", "a", 16 * GB, "w1", a).verdict is Verdict.RUN
    d = adm.admit("g0", "b", 16 * GB, "w2", b)
    assert d.verdict is Verdict.WAIT and d.bytes == 8 * GB
    assert adm.reserved_bytes("g0") == 16 * GB
    assert not adm.release("g0", "a", "w2")  # not w2's
    assert adm.release("g0", "a", "w1")
    assert adm.dispatch("g0", "w1") == "b"  # the waiting job is reserved for its GPU's queue
    assert adm.admit("g0", "b", 16 * GB, "w2", b).verdict is Verdict.RUN  # and started there
    assert [r.worker for r in adm.reservations("g0")] == ["w2"]
    adm.release("g0", "b", "w2")
    assert adm.reserved_bytes("g0") == 0 and adm.waiting() == []


def test_reservation_of_a_dead_worker_is_reclaimed(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, g0=24)
    alive(client, "w1")
    assert adm.admit("g0", "a", 20 * GB, "w1", queued(store, "a")).verdict is Verdict.RUN
    client.delete(WORKER_HEARTBEAT + "w1")  # its heartbeat expired
    assert adm.reclaim() == 1 and adm.reserved_bytes("g0") == 0


def test_too_big_for_this_gpu_waits_for_a_bigger_one_or_fits_nowhere(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, small=24, big=80)
    alive(client, "w")
    assert adm.admit("small", "a", 40 * GB, "w", queued(store, "a")).verdict is Verdict.BIGGER
    d = adm.admit("small", "b", 90 * GB, "w", queued(store, "b"))
    assert d.verdict is Verdict.NEVER and d.bytes == 80 * GB
    assert [j for j, _, _ in adm.waiting()] == ["a"]
    assert adm.dispatch("small", "w") is None and adm.dispatch("big", "w") == "a"


def test_waiting_order_is_stat_then_routine_then_bulk_then_time(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, g0=10)
    alive(client, "w")
    assert adm.admit("g0", "run", 10 * GB, "w", queued(store, "run", at=0.5)).verdict is Verdict.RUN
    for job, queue, at in (("bulk1", "bulk", 1.0), ("r1", "routine", 2.0), ("r2", "routine", 3.0), ("s1", "stat", 4.0)):
        verdict = adm.admit("g0", job, 5 * GB, "w", queued(store, job, queue, at)).verdict
        assert verdict in (Verdict.WAIT, Verdict.HELD)  # held: for an older job that waits already
    assert [j for j, _, _ in adm.waiting()] == ["s1", "r1", "r2", "bulk1"]


def test_a_waiting_stat_job_holds_the_gpu_against_jobs_that_would_delay_it(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, g0=24)
    alive(client, "w")
    assert adm.admit("g0", "big", 16 * GB, "w", queued(store, "big", at=1.0)).verdict is Verdict.RUN
    assert adm.admit("g0", "stat", 20 * GB, "w", queued(store, "stat", "stat", 2.0)).verdict is Verdict.WAIT
    # 2 GB still leave the stat job room once the 16 GB job ends (24 - 2 >= 20); 4 GB more would not
    assert adm.admit("g0", "small", 2 * GB, "w", queued(store, "small", at=3.0)).verdict is Verdict.RUN
    d = adm.admit("g0", "mid", 4 * GB, "w", queued(store, "mid", at=4.0))
    assert d.verdict is Verdict.HELD and d.other_job == "stat"
    adm.release("g0", "big", "w")
    assert adm.dispatch("g0", "w") == "stat"


def test_an_older_waiting_job_that_fits_goes_first(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, g0=24)
    alive(client, "w")
    adm.admit("g0", "a", 20 * GB, "w", queued(store, "a", at=1.0))
    assert adm.admit("g0", "old", 10 * GB, "w", queued(store, "old", at=2.0)).verdict is Verdict.WAIT
    adm.release("g0", "a", "w")
    d = adm.admit("g0", "new", 10 * GB, "w", queued(store, "new", at=3.0))
    assert d.verdict is Verdict.SWAP and d.other_job == "old"
    assert [j for j, _, _ in adm.waiting()] == ["new"]


def test_a_pending_reservation_of_a_cancelled_job_is_dropped(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, g0=24)
    alive(client, "w")
    adm.admit("g0", "a", 20 * GB, "w", queued(store, "a", at=1.0))
    adm.admit("g0", "b", 10 * GB, "w", queued(store, "b", at=2.0))
    adm.release("g0", "a", "w")
    assert adm.dispatch("g0", "w") == "b"  # reserved, in the GPU's queue, not started
    store.set_state("b", JobState.CANCELLED)  # its task is revoked: no worker will start it
    assert adm.reclaim() == 1 and adm.reserved_bytes("g0") == 0


def test_forget_takes_a_job_out_of_waiting_and_drops_only_pending_reservations(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, g0=24, g1=24)
    alive(client, "w")
    assert adm.admit("g0", "run", 20 * GB, "w", queued(store, "run", at=1.0)).verdict is Verdict.RUN
    adm.admit("g0", "wait", 10 * GB, "w", queued(store, "wait", at=2.0))
    adm.admit("g0", "next", 10 * GB, "w", queued(store, "next", at=3.0))
    assert adm.forget("wait") == (True, [])
    assert [j for j, _, _ in adm.waiting()] == ["next"] and adm.forget("wait") == (False, [])
    assert adm.dispatch("g1", "w") == "next"  # reserved for g1's queue, pending
    assert adm.forget("next") == (False, ["g1"]) and adm.reserved_bytes("g1") == 0
    assert adm.forget("run") == (False, []) and adm.reserved_bytes("g0") == 20 * GB  # the worker's own


def test_default_estimate_grows_with_matrix_and_coils() -> None:
    small = synthetic_scan(matrix=(64, 64), ncoil=4).header
    big = synthetic_scan(matrix=(128, 128), ncoil=16).header
    assert CONTEXT_BYTES < default_estimate(small, {}) < default_estimate(big, {})
    enc = big.encoding[0].encodedSpace.matrixSize
    assert default_estimate(big, {}) == CONTEXT_BYTES + 4 * enc.x * enc.y * max(1, enc.z) * 16 * 8


class Plain(Pipeline):
    """A pipeline that keeps the contract's defaults."""

    name = "plain"

    def run(self, scan: object, params: Mapping[str, Any], progress: object) -> list:
        return []


def test_the_contract_defaults() -> None:
    header = synthetic_scan(matrix=(32, 32), ncoil=2).header
    plain = Plain()
    assert plain.cpu_capable is True
    assert plain.memory_estimate(header, {}) is None and plain.runtime_estimate(header, {}) is None
    with pytest.raises(TypeError):
        Pipeline()  # type: ignore[abstract]  # run is required


def test_estimate_precedence_params_then_pipeline_then_default() -> None:
    header = synthetic_scan(matrix=(32, 32), ncoil=2).header

    class Own(Plain):
        name = "own"

        def memory_estimate(self, header: object, params: Mapping[str, Any]) -> int | None:
            return None if params.get("generic") else 7 * GB

    assert estimate_bytes(header, {"gpu_memory_gb": 3}, Own()) == 3 * GB
    assert estimate_bytes(header, {}, Own()) == 7 * GB
    assert estimate_bytes(header, {"generic": True}, Own()) == default_estimate(header, {})  # None: the model
    assert estimate_bytes(header, {}, Plain()) == estimate_bytes(header, {}) == default_estimate(header, {})
    with pytest.raises(EstimateError):
        estimate_bytes(header, {"gpu_memory_gb": -1})


def test_simulated_inventory_is_named_as_such(settings) -> None:
    inv = make_inventory(settings.model_copy(update={"simulated_gpus": [80, 24]}))
    assert isinstance(inv, SimulatedInventory)
    g = inv.gpus()
    assert [x.name for x in g] == ["SIMULATED GPU 0 (80 GB)", "SIMULATED GPU 1 (24 GB)"]
    assert all(x.simulated and x.free_bytes == x.total_bytes for x in g)


def test_no_gpu_here_says_why(settings) -> None:
    inv = make_inventory(settings)  # this machine and CI have no NVIDIA driver
    if not isinstance(inv, NoGpuInventory):
        pytest.skip("an NVIDIA GPU is present")
    assert inv.gpus() == [] and inv.reason


def workers(client: redis.Redis, adm: Admission, gpu: str, *names: str) -> None:
    """Live workers registered as ``gpu``'s worker slots."""
    alive(client, *names)
    for w in names:
        adm.register_worker(gpu, w)


def test_a_gpu_is_filled_best_fit_up_to_its_idle_worker_slots(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, g0=24)
    workers(client, adm, "g0", "w1", "w2", "w3")
    now = time.time()  # recent: no job has waited past the backfill limit
    assert adm.admit("g0", "full", 24 * GB, "w1", queued(store, "full", at=now)).verdict is Verdict.RUN
    for job, size, at in (("small", 4, now + 1), ("mid", 10, now + 2), ("large", 18, now + 3), ("x", 5, now + 4)):
        assert adm.admit("g0", job, size * GB, "w2", queued(store, job, at=at)).verdict is Verdict.WAIT
    adm.release("g0", "full", "w1")
    # the largest that fits first (not the oldest), then the largest that fits what is left; three slots
    # are idle but 18 + 5 GB leave no room for another waiting job
    assert adm.fill("g0", "w1") == ["large", "x"]
    assert [j for j, _, _ in adm.waiting()] == ["small", "mid"]
    assert adm.reserved_bytes("g0") == 23 * GB


def test_fill_stops_at_the_idle_worker_slots(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, g0=80)
    workers(client, adm, "g0", "w1", "w2")
    now = time.time()
    assert adm.admit("g0", "run", 78 * GB, "w1", queued(store, "run", at=now)).verdict is Verdict.RUN
    for k in range(3):
        adm.admit("g0", f"j{k}", 5 * GB, "w2", queued(store, f"j{k}", at=now + 1 + k))
    adm.release("g0", "run", "w1")
    assert len(adm.fill("g0", "w1")) == 2  # two workers, nothing running: two jobs, not three


def test_a_stat_job_goes_before_a_better_fit(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, g0=24)
    workers(client, adm, "g0", "w1")
    now = time.time()
    adm.admit("g0", "full", 24 * GB, "w1", queued(store, "full", at=now))
    adm.admit("g0", "large", 20 * GB, "w1", queued(store, "large", at=now + 1))
    adm.admit("g0", "stat", 4 * GB, "w1", queued(store, "stat", "stat", now + 2))
    adm.release("g0", "full", "w1")
    assert adm.dispatch("g0", "w1") == "stat"


def test_a_holding_job_holds_only_the_gpu_where_it_fits_soonest(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, g0=24, g1=24)
    workers(client, adm, "g0", "a1", "a2")
    workers(client, adm, "g1", "b1", "b2")
    now = time.time()
    assert adm.admit("g0", "r0", 14 * GB, "a1", queued(store, "r0", at=now)).verdict is Verdict.RUN
    assert adm.admit("g1", "r1", 10 * GB, "b1", queued(store, "r1", at=now)).verdict is Verdict.RUN
    # fits neither now; g1 has more memory available (14 GB against 10), so it waits for g1
    assert adm.admit("g0", "stat", 20 * GB, "a2", queued(store, "stat", "stat", now + 1)).verdict is Verdict.WAIT
    # 6 GB on g1 would delay it past the end of the 10 GB job there (24 - 6 < 20): g0, not held, takes it
    d = adm.admit("g1", "small", 6 * GB, "b2", queued(store, "small", at=now + 2))
    assert d.verdict is Verdict.MOVED and d.other_job == "g0"
    assert d.dispatched == (("small", "g0"),)
    adm.release("g1", "r1", "b1")
    assert adm.fill("g1", "b1") == ["stat"]


def test_a_job_that_does_not_fit_here_moves_to_a_gpu_with_idle_workers(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, small=24, big=80)
    workers(client, adm, "small", "s1")
    workers(client, adm, "big", "b1")
    d = adm.admit("small", "a", 40 * GB, "s1", queued(store, "a", at=time.time()))
    assert d.verdict is Verdict.MOVED and d.other_job == "big" and d.dispatched == (("a", "big"),)
    assert adm.waiting() == [] and [r.job_id for r in adm.reservations("big")] == ["a"]
    assert adm.admit("big", "a", 40 * GB, "b1", queued(store, "a")).verdict is Verdict.RUN  # started there
    assert [r.worker for r in adm.reservations("big")] == ["b1"]


def test_run_time_estimate_precedence_params_then_pipeline_then_history(client: redis.Redis) -> None:
    header = synthetic_scan(matrix=(32, 32), ncoil=2).header

    class Timed(Plain):
        name = "timed"

        def runtime_estimate(self, header: object, params: object) -> float:
            return 40.0

    assert estimate_seconds(header, {"expected_seconds": "12.5"}, Timed(), history=99.0) == 12.5
    assert estimate_seconds(header, {}, Timed(), history=99.0) == 40.0
    assert estimate_seconds(header, {}, Plain(), history=99.0) == 99.0  # None from the hook: the history
    assert estimate_seconds(header, {}, Plain()) == estimate_seconds(header, {}) == 0.0  # not known
    for bad in ("soon", 0, -3):
        with pytest.raises(EstimateError, match="expected_seconds"):
            estimate_seconds(header, {"expected_seconds": bad})
    assert history_seconds(client, "sense", "t1_tse") is None
    for s in [100.0] * 5 + [10.0, 20.0, 30.0]:  # the latest HISTORY_KEPT count; the median resists outliers
        record_runtime(client, "sense", "t1_tse", s)
    assert history_seconds(client, "sense", "t1_tse") == 100.0
    for _ in range(HISTORY_KEPT):
        record_runtime(client, "sense", "t1_tse", 7.0)
    assert history_seconds(client, "sense", "t1_tse") == 7.0  # the old runs are forgotten
    assert history_seconds(client, "sense", "other") is None


def submitted(store: JobStore, adm: Admission, *jobs: tuple[str, float, float], queue: str = "routine"
              ) -> tuple[list[str], dict[str, str]]:
    """Place (job id, GB, expected seconds) jobs as one batch; (jobs not placed, job -> GPU reserved)."""
    now = time.time()
    entries = [(job, int(size * GB), queued(store, job, queue, now), secs) for job, size, secs in jobs]
    unplaced, dispatched = adm.submit(entries)
    return unplaced, dict(dispatched)


def test_a_batch_is_placed_as_a_whole(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, big=80, small=24)
    workers(client, adm, "big", "b1", "b2", "b3", "b4")
    workers(client, adm, "small", "s1", "s2")
    # listed small first: placed one by one, the small jobs would take the big GPU
    unplaced, placed = submitted(store, adm, ("s4", 4, 10), ("s3", 3, 10), ("m20", 20, 10), ("L40", 40, 10),
                                 ("L38", 38, 10), ("m6", 6, 10))
    assert unplaced == []
    # the large jobs start at once on the one GPU that can take them, the mid-sized one on the small GPU;
    # the 2 GB left on the big GPU fit nothing, and the rest wait
    assert placed == {"L40": "big", "L38": "big", "m20": "small", "s4": "small"}
    assert sorted(j for j, _, _ in adm.waiting()) == ["m6", "s3"]
    assert adm.reserved_bytes("big") == 78 * GB and adm.reserved_bytes("small") == 24 * GB
    # pending reservations belong to a live worker of their GPU: reclaimed if it dies
    assert {r.worker.split(">")[0] for r in adm.reservations("big")} <= {"b1", "b2", "b3", "b4"}


def test_jobs_no_gpu_can_take_are_left_to_their_queues(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    gpus(adm, small=24)
    assert submitted(store, adm, ("a", 4, 10)) == (["a"], {})  # no live worker yet
    assert adm.waiting() == []
    workers(client, adm, "small", "s1")
    unplaced, placed = submitted(store, adm, ("huge", 30, 10), ("b", 4, 10))
    assert unplaced == ["huge"] and placed == {"b": "small"}  # too large for every GPU: a worker decides
    assert adm.waiting() == []


def held_gpu(client: redis.Redis, adm: Admission, store: JobStore, held_queue: str, run_seconds: float = 100.0,
             nworkers: int = 4) -> None:
    """An 80 GB GPU running a 50 GB job expected to end in ``run_seconds`` (0: not known), and a waiting
    70 GB job held for it; ``nworkers`` workers on it."""
    gpus(adm, big=80, small=24)  # 70 GB: a large job, which holds the one GPU it fits
    workers(client, adm, "big", *[f"b{i}" for i in range(1, nworkers + 1)])
    workers(client, adm, "small", "s1")
    now = time.time()
    assert adm.admit("big", "run", 50 * GB, "b1", queued(store, "run", at=now), run_seconds).verdict is Verdict.RUN
    assert adm.admit("small", "busy", 24 * GB, "s1", queued(store, "busy", at=now), 1000.0).verdict is Verdict.RUN
    assert adm.admit("big", "held", 70 * GB, "b2", queued(store, "held", held_queue, now), 50.0).verdict is Verdict.WAIT
    assert [j for j, _, _ in adm.waiting()] == ["held"]


def test_backfill_starts_only_jobs_that_do_not_delay_the_held_job(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    held_gpu(client, adm, store, "routine")
    # the held job fits when `run` ends (in 100 s), with 10 GB to spare then
    unplaced, placed = submitted(store, adm, ("short", 15, 10), ("long", 15, 500), ("tiny", 8, 500),
                                 ("unknown", 15, 0))
    # `short` ends before then, `tiny` fits the spare 10 GB; `long` would delay the held job, and
    # `unknown` might: both wait
    assert unplaced == [] and placed == {"tiny": "big", "short": "big"}
    assert sorted(j for j, _, _ in adm.waiting()) == ["held", "long", "unknown"]


def test_a_held_stat_job_is_backfilled_only_with_memory_it_never_needs(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    held_gpu(client, adm, store, "stat")
    # a patient waits: a job expected to end in time might not, so only the spare 10 GB is backfilled
    unplaced, placed = submitted(store, adm, ("short", 15, 10), ("tiny", 8, 500))
    assert unplaced == [] and placed == {"tiny": "big"}
    assert sorted(j for j, _, _ in adm.waiting()) == ["held", "short"]


def test_a_job_past_its_expected_end_stops_backfill_by_time(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    held_gpu(client, adm, store, "routine")
    client.hset(GPU_RESERVATION_ENDS + "big", "run", time.time() - 5)  # `run` overran its estimate
    unplaced, placed = submitted(store, adm, ("short", 15, 10), ("tiny", 8, 500))
    assert placed == {"tiny": "big"}  # the held job may fit any moment now: nothing ends "before" it
    assert sorted(j for j, _, _ in adm.waiting()) == ["held", "short"]


def test_backfill_uses_the_last_idle_worker(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    held_gpu(client, adm, store, "routine", nworkers=2)  # one idle worker: the job that frees the memory
    unplaced, placed = submitted(store, adm, ("short", 15, 10), ("tiny", 8, 500))  # frees a worker too
    assert placed == {"tiny": "big"}  # the better fit of the two allowed
    assert sorted(j for j, _, _ in adm.waiting()) == ["held", "short"]


def test_a_hold_behind_a_job_of_unknown_run_time_backfills_only_spare_memory(client: redis.Redis) -> None:
    adm, store = Admission(client), JobStore(client)
    held_gpu(client, adm, store, "routine", run_seconds=0)  # when the held job fits is not known
    unplaced, placed = submitted(store, adm, ("short", 15, 1), ("tiny", 8, 36000))
    assert placed == {"tiny": "big"}  # the spare 10 GB, however long; not even a 1 s job beyond it
    assert sorted(j for j, _, _ in adm.waiting()) == ["held", "short"]


def test_estimates_use_the_header_the_caller_has(client: redis.Redis, tmp_path) -> None:
    """The gateway places a job with the header it parsed: no raw file is read before the ack."""
    store, scans = JobStore(client), ScanStore(tmp_path)  # no raw file stored for the scan
    job = Job(id="h", scan_id="nofile", pipeline="cartesian", params={"expected_seconds": 5})
    store.create(job)
    pipeline = get_pipeline("cartesian")
    with pytest.raises(FileNotFoundError):
        estimate_job(job, scans, pipeline, store)
    header = synthetic_scan(matrix=(32, 32), ncoil=2).header
    estimate = estimate_job(job, scans, pipeline, store, header)
    assert estimate == Estimate(estimate_bytes(header, job.params, pipeline), 5.0)
    kept = store.get("h")
    assert kept is not None and (kept.mem_estimate_bytes, kept.runtime_estimate_s) == (estimate.bytes, 5.0)


def redis_contents(client: redis.Redis) -> dict[str, object]:
    return {key: client.dump(key) for key in sorted(client.keys("*"))}


def test_a_script_whose_gpu_list_is_stale_writes_nothing(client: redis.Redis) -> None:
    """Every key a script touches is passed to it: one that finds a GPU its caller did not list (a GPU that
    appeared between the read and the run) refuses before writing, and the caller reads the lists again."""
    from reconq.scheduler.admission import STALE, _AdmitArgs, _Lists

    adm, store = Admission(client), JobStore(client)
    gpus(adm, g0=24, g1=24)
    alive(client, "w0")
    queued(store, "a")
    full = adm._lists("g0", "w0")
    assert full.gpus == ("g0", "g1")
    partial = _Lists(("g0",), full.workers)
    args = _AdmitArgs(**adm._policy(4), gpu="g0", job="a", need=GB, owner="w0", score=1.0, seconds=0.0)
    before = redis_contents(client)
    with pytest.raises(redis.ResponseError, match=STALE):
        adm._admit(keys=partial.keys(), args=[*args.argv(), *partial.argv()])
    assert redis_contents(client) == before
    assert adm.admit("g0", "a", GB, "w0", 1.0).verdict is Verdict.RUN  # with fresh lists it goes through
