"""`hetero run --plan/--memory`: the JSON contract (predicted vs measured) and budgets that hold."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import hetero
from tests.runtime_engine.helpers import half, uniform_plan
from hetero.runtime.memory import Footprint, cached_bytes, drop_cache, rss_bytes

TINY = "synthetic:tiny"


def run_json(args, capsys=None) -> dict:
    """`hetero run ... --json` in a process of its own: footprints are whole-process figures (peak
    RSS), which the test runner's own history would otherwise inflate."""
    out = subprocess.run([sys.executable, "-m", "hetero.cli", *args, "--json"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def fresh_baseline() -> int:
    """The runtime baseline as a fresh `hetero run` process measures it."""
    code = "from hetero.runtime.baseline import runtime_baseline; print(runtime_baseline())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              timeout=300).stdout.strip())


def test_run_with_a_plan_file_reports_predicted_and_measured(tmp_path, capsys):
    spec = hetero.spec(TINY)
    budget = fresh_baseline() + 200 * 10**6
    plan = uniform_plan(spec, "int8", half(spec), budgets={"cpu": budget}, memory={"cpu": 10**6})
    path = tmp_path / "plan.json"
    plan.save(path)
    d = run_json(["run", TINY, "--plan", str(path), "-n", "5", "--no-chat"], capsys)
    for k in ("model", "dtype", "text", "token_ids", "prompt_tokens", "generated_tokens", "prefill_tok_s",
              "decode_tok_s", "finish_reason", "peak_rss_bytes", "load_s"):
        assert k in d  # the foundation's keys stay
    assert d["dtype"] == "int8" and d["generated_tokens"] == 5
    assert d["budget_bytes"]["cpu"] == budget
    for side in ("predicted", "measured"):
        assert set(d[side]) >= {"prefill_tok_s", "decode_tok_s", "footprint_bytes"}
    assert d["measured"]["decode_tok_s"] > 0 and d["measured"]["prefill_tok_s"] > 0
    fp = d["measured"]["footprint_bytes"]
    assert fp["cpu"] >= d["peak_rss_bytes"] * 0.99 and fp["disk"] > 0
    assert d["over_budget"] == {} and fp["cpu"] <= budget * 1.05
    assert d["streaming"][0]["read_bytes"] > 0


def test_run_plans_from_budgets_and_the_whole_process_fits(tmp_path, capsys):
    """--memory plans with this process's measured baseline as the reserve; the run stays inside."""
    from hetero.hardware.inventory import inventory

    budget = fresh_baseline() + 100 * 10**6
    hw = tmp_path / "hw.json"
    hw.write_text(json.dumps(inventory().to_dict()))  # this machine's devices, no micro-benchmarks needed
    d = run_json(["run", TINY, "--memory", f"cpu={budget}", "--precisions", "bf16", "--hardware", str(hw),
                  "-n", "4", "--no-chat"], capsys)
    assert d["plan"]["reserve"]["cpu"] > 100 * 10**6  # the interpreter and torch are in the budget
    assert {u["precision"] for u in d["plan"]["units"]} == {"bf16"}
    assert d["measured"]["footprint_bytes"]["cpu"] <= budget * 1.05
    assert d["predicted"]["footprint_bytes"]["cpu"] <= budget


def test_footprint_counts_page_cache_of_model_files(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"\1" * (8 << 20))
    drop_cache(f)
    assert cached_bytes(f) < (1 << 20)
    f.read_bytes()  # buffered read: the pages stay cached
    assert cached_bytes(f) >= (7 << 20)
    mon = Footprint([f])
    assert mon.sample() >= rss_bytes() + (7 << 20) - (1 << 20)
    drop_cache(f)
    assert cached_bytes(f) < (1 << 20)
