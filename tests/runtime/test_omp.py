"""runtime/omp.release_pool: a thread done with torch lets its OpenMP workers go."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from hetero.runtime import omp


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2,
                    reason="counts this process's threads on a machine with 2+ cores")
def test_a_threads_workers_exit_when_it_releases_its_pool():
    if omp._runtime() is None:
        pytest.skip("no OpenMP runtime with omp_pause_resource_all is loaded")
    out = {}

    def work():
        before = _threads()
        torch.ones(1 << 22).mul_(2.0).sum()          # a parallel region: this thread's pool is made
        out["with_pool"] = _threads()
        out["released"] = omp.release_pool()
        for _ in range(100):                          # the workers exit as they are released
            if _threads() < out["with_pool"]:
                break
            time.sleep(0.01)
        out["after"], out["before"] = _threads(), before
        out["again"] = float(torch.ones(1 << 22).mul_(2.0).sum())  # and come back if it computes again

    t = threading.Thread(target=work)
    t.start()
    t.join(30)
    assert out["released"] is True
    assert out["with_pool"] > out["before"]
    assert out["after"] < out["with_pool"]
    assert out["again"] == 2.0 * (1 << 22)
