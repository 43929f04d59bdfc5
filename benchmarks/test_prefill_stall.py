"""Chunked prefill: a 2,000-token prompt arriving while 7 streams decode keeps their inter-token p99
during its prefill under 3x their p50 before it. Timing: run on a quiet machine.

    PYTHONPATH=src .venv/bin/python -m pytest -m slow_bench benchmarks/test_prefill_stall.py
"""
from __future__ import annotations

import pytest

from benchmarks.bench_json import run_json


@pytest.mark.slow_bench
def test_a_long_prompt_keeps_the_running_streams_p99_under_3x_their_p50(tmp_path):
    res = run_json(tmp_path, "prefill_stall.py", "--model", "smollm2-135m", "--streams", "7", "--prompt-tokens", "2000")
    assert res["gaps_before"] > 0 and res["gaps_during"] > 0, res
    assert res["streams_still_running_at_first_token"] == 7, res  # they decoded all through the prefill
    assert res["p99_during_over_p50_before"] < 3.0, res
