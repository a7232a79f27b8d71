"""``GET /metrics`` in the Prometheus text format (version 0.0.4), read from Redis on each scrape.

Jobs by state and the run-time histogram come from the job records; queue depths from Celery's queue
lists; retrieval outcomes from the retrieval log; gateway counters from the hash
``reconq:stats:gateway`` when the gateway keeps one; GPUs from the workers' heartbeats
(:func:`reconq.scheduler.monitor.cluster_status`, as ``/api/gpus``); the data root's free and total bytes from
its file system (:func:`reconq.core.diskuse.file_system`, no walk). A scrape only reads.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from reconq.core.constants import GATEWAY_STATS, QUEUE_ORDER
from reconq.core.diskuse import FileSystem
from reconq.core.jobs import JobStore
from reconq.core.states import JobState
from reconq.scheduler.monitor import GpuStatus

#: Upper bounds (seconds) of the job run-time histogram.
DURATION_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _line(name: str, value: float, labels: Mapping[str, str] | None = None) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in (labels or {}).items())
    text = "+Inf" if value == math.inf else repr(float(value)) if not float(value).is_integer() else str(int(value))
    return f"{name}{{{inner}}} {text}" if inner else f"{name} {text}"


def _family(name: str, kind: str, doc: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *samples]


def queue_depths(store: JobStore) -> dict[str, int]:
    """Messages waiting in each Celery queue (Redis lists named after the queues)."""
    pipe = store.redis.pipeline()
    for q in QUEUE_ORDER:
        pipe.llen(q.value)
    return {q.value: int(n) for q, n in zip(QUEUE_ORDER, pipe.execute(), strict=True)}


def _job_samples(store: JobStore) -> tuple[Counter[str], list[float]]:
    states: Counter[str] = Counter()
    durations: list[float] = []
    for _, (state, started, finished) in store.scan_fields(["state", "started_at", "finished_at"]):
        states[state or "unknown"] += 1
        if state == JobState.DONE.value and started and finished:
            durations.append(max(0.0, float(finished) - float(started)))
    return states, durations


def _histogram(name: str, doc: str, values: Sequence[float]) -> list[str]:
    samples = [_line(f"{name}_bucket", sum(1 for v in values if v <= b), {"le": str(b)}) for b in DURATION_BUCKETS]
    samples += [_line(f"{name}_bucket", len(values), {"le": "+Inf"}), _line(f"{name}_sum", sum(values)),
                _line(f"{name}_count", len(values))]
    return _family(name, "histogram", doc, samples)


def _gpu_lines(gpus: Sequence[GpuStatus]) -> list[str]:
    families = {
        "reconq_gpu_memory_used_bytes": ("GPU memory in use, as the workers report it.", "used_bytes"),
        "reconq_gpu_memory_total_bytes": ("GPU memory in all.", "total_bytes"),
        "reconq_gpu_memory_reserved_bytes": ("GPU memory reserved by ReconQ jobs.", "reserved_bytes"),
        "reconq_gpu_utilization_percent": ("GPU utilisation.", "utilization_pct"),
        "reconq_gpu_temperature_celsius": ("GPU temperature.", "temperature_c"),
    }
    out: list[str] = []
    for name, (doc, attr) in families.items():
        samples = [_line(name, float(getattr(g, attr)), {"gpu": g.id, "host": g.host, "simulated": str(g.simulated)
                                                         .lower()})
                   for g in gpus if getattr(g, attr) is not None]
        out += _family(name, "gauge", doc, samples)
    return out


def _disk_lines(disk: FileSystem | None) -> list[str]:
    if disk is None:  # the data dir could not be read: the families say so by having no sample
        return []
    return (_family("reconq_disk_free_bytes", "gauge", "Free bytes on the data root's file system (for unprivileged "
                    "writers, as new scans need).", [_line("reconq_disk_free_bytes", disk.free_bytes)])
            + _family("reconq_disk_total_bytes", "gauge", "Size of the data root's file system in bytes.",
                      [_line("reconq_disk_total_bytes", disk.total_bytes)]))


def render(store: JobStore, gpus: Sequence[GpuStatus], disk: FileSystem | None = None) -> str:
    """Every ReconQ metric as Prometheus text (the disk gauges where ``disk`` is given)."""
    states, durations = _job_samples(store)
    out = _family("reconq_jobs", "gauge", "Jobs by state.",
                  [_line("reconq_jobs", states.get(s.value, 0), {"state": s.value}) for s in JobState])
    out += _family("reconq_queue_depth", "gauge", "Messages waiting in each Celery queue.",
                   [_line("reconq_queue_depth", n, {"queue": q}) for q, n in queue_depths(store).items()])
    out += _histogram("reconq_job_run_seconds", "Run time of finished (done) jobs, start to finish.", durations)
    found, missed = store.retrieval_totals()
    out += _family("reconq_retrievals_total", "counter", "Retrieval scans by outcome.",
                   [_line("reconq_retrievals_total", found, {"outcome": "found"}),
                    _line("reconq_retrievals_total", missed, {"outcome": "not_found"})])
    for field, value in sorted(store.redis.hgetall(GATEWAY_STATS).items()):
        name = f"reconq_gateway_{field}"
        try:
            out += _family(name, "counter" if field.endswith("_total") else "gauge", f"Gateway counter {field}.",
                           [_line(name, float(value))])
        except ValueError:
            continue
    out += _gpu_lines(gpus)
    out += _disk_lines(disk)
    return "\n".join(out) + "\n"
