"""KV pool: a load that asks for more blocks than the pool has queues and completes, and the server's
footprint (RSS + model file page cache, measured from outside) stays within the budget + 5%.

    PYTHONPATH=src .venv/bin/python -m pytest -m slow_bench benchmarks/test_kv_pool_footprint.py
"""
from __future__ import annotations

import pytest

from benchmarks.bench_json import run_json


@pytest.mark.slow_bench
def test_a_load_past_the_pool_queues_completes_and_stays_within_the_budget(tmp_path):
    res = run_json(tmp_path, "kv_pool_footprint.py", "--model", "smollm2-135m", "--memory", "cpu=1GB",
                   "--context", "2048", "--clients", "32")
    assert res["tokens_asked_at_once"] > res["pool_tokens"] and res["most_waiting"] >= 1, res
    assert res["failed"] == 0, res
    assert res["peak_footprint_bytes"] <= 1.05 * res["budget_bytes"], res
