"""The runtime baseline (a plan's reserve) is measured once and reused only by a process that starts
as the measured one did; a process that already holds more measures itself, so a reserve never
counts less than the process holds."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from hetero.runtime.baseline import TOLERANCE

# start RSS, reserve, whether the warm-up ran (torch imported), and RSS at the end, of a fresh process
CODE = """
import json, sys
ballast = bytearray(int(sys.argv[1]))
for i in range(0, len(ballast), 4096): ballast[i] = 1   # resident, not just reserved
from hetero.runtime.memory import rss_bytes
from hetero.runtime.baseline import runtime_baseline
start = rss_bytes()
reserve = runtime_baseline()
print(json.dumps({"start": start, "reserve": reserve, "measured": "torch" in sys.modules, "end": rss_bytes()}))
"""


def baseline_process(cache, ballast: int = 0) -> dict:
    out = subprocess.run([sys.executable, "-c", CODE, str(ballast)], capture_output=True, text=True, check=True,
                         timeout=600, env={**os.environ, "HETERO_CACHE": str(cache)})
    return json.loads(out.stdout)


def test_measured_once_then_reused_by_a_like_process_and_measured_again_by_a_bigger_one(tmp_path):
    first = baseline_process(tmp_path)
    assert first["measured"] and first["reserve"] == first["end"] > first["start"] + 100 * 10**6
    assert len(list((tmp_path / "baseline").glob("*.json"))) == 1
    again = baseline_process(tmp_path)
    assert not again["measured"]  # no imports, no warm-up forwards, no plan: the cached growth
    assert abs(again["reserve"] - first["reserve"]) <= TOLERANCE
    assert again["reserve"] - again["start"] == first["reserve"] - first["start"]
    big = baseline_process(tmp_path, ballast=4 * TOLERANCE)
    assert big["measured"] and big["reserve"] >= big["start"]
    assert big["reserve"] >= first["reserve"] + 3 * TOLERANCE  # its ballast is in its reserve
