"""`hetero pipeline` runs the planner's per-unit choices per rank through the one engine: with no model
it runs the built-in one and gives `hetero run`'s greedy tokens for the same choices, and a rank whose
budget cannot hold its stage streams layers from disk and stays inside that budget."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]

N = 6


def _cli(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "hetero.cli", *args], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1] if args[0] == "run" else r.stdout)


@pytest.fixture(scope="module")
def one_process():
    # planned as the pipeline plans (objective decode, every precision allowed); one thread, as each rank
    return _cli("run", "-p", "hi", "-n", str(N), "--objective", "decode", "--threads", "1", "--json")


def _choices(units: list[dict]) -> list[tuple[str, str]]:
    return [(u["name"], u["precision"]) for u in units]


def test_no_model_runs_the_builtin_one_with_runs_tokens(one_process):
    res = _cli("pipeline", "--ranks", "2", "-p", "hi", "-n", str(N), "--json")
    assert res["plan"]["model"]["name"] == one_process["model"]
    assert len(res["plan"]["stages"]) == 2
    assert _choices(res["plan"]["units"]) == _choices(one_process["plan"]["units"])  # the same choices ...
    assert res["sequences"][0]["token_ids"] == one_process["token_ids"]             # ... the same tokens


def test_a_tight_rank_streams_from_disk_within_its_budget(one_process, tmp_path):
    hosts = tmp_path / "hosts.yaml"  # two local ranks; the second may hold 35 MB beyond its runtime
    hosts.write_text("hosts:\n  - address: 127.0.0.1\n  - address: localhost\n    memory: 35MB\n")
    res = _cli("pipeline", "--hosts", str(hosts), "--layers", "15,15", "-p", "hi", "-n", str(N), "--json")
    r0, r1 = res["ranks"]
    assert r0["streamed_units"] == [] and r1["streamed_units"]
    assert all(s["direct"] and s["read_bytes"] > 0 for s in r1["streaming"])  # read with O_DIRECT
    # measured: the whole rank process (RSS + cached model pages) at its peak, against its own budget
    assert r1["footprint_bytes"]["cpu"] <= r1["budget_bytes"]["cpu"]
    assert r1["over_budget"] == {}
    if _choices(res["plan"]["units"]) == _choices(one_process["plan"]["units"]):
        assert res["sequences"][0]["token_ids"] == one_process["token_ids"]  # residency changes no arithmetic
