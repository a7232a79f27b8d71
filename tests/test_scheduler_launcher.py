"""Worker processes per GPU: one count for all, one per GPU, or by memory (``auto``)."""

from __future__ import annotations

import pytest

from reconq.core.settings import Settings
from reconq.scheduler.inventory import make_inventory
from reconq.workers.launcher import LaunchError, per_gpu_counts, plan


@pytest.fixture
def mixed(settings: Settings) -> Settings:
    return settings.model_copy(update={"simulated_gpus": [80, 80, 24, 24]})


def test_per_gpu_counts_for_all_per_gpu_or_by_memory(mixed: Settings) -> None:
    inv, gpus = make_inventory(mixed), [0, 1, 2, 3]
    assert per_gpu_counts(mixed, inv, gpus, 2) == [2, 2, 2, 2]
    assert per_gpu_counts(mixed, inv, gpus, "3") == [3, 3, 3, 3]
    assert per_gpu_counts(mixed, inv, gpus, "12,12,3,3") == [12, 12, 3, 3]
    assert per_gpu_counts(mixed, inv, gpus, "auto") == [12, 12, 4, 4]  # 6 GB a slot, at most 12
    small = mixed.model_copy(update={"slot_gb": 30.0, "max_workers_per_gpu": 2})
    assert per_gpu_counts(small, inv, gpus, "auto") == [2, 2, 1, 1]  # at least one
    for bad in ("12,12", "x", "-1"):
        with pytest.raises(LaunchError):
            per_gpu_counts(mixed, inv, gpus, bad)


def test_plan_starts_the_counted_processes_on_each_gpu(mixed: Settings) -> None:
    children = plan(mixed, make_inventory(mixed), [0, 2], "5,2", cpu=1)
    assert [c.label.split("#")[0].rsplit(":", 1)[-1] for c in children] == ["sim0"] * 5 + ["sim2"] * 2 + ["cpu"]
    assert all(c.env["CUDA_VISIBLE_DEVICES"] == "" for c in children)  # simulated: no real GPU visible
