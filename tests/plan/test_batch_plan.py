"""Batch size as a plan decision (plan/batch.py) and the cost of a B-row decode step (cost.compute_terms)."""
from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from hetero import cost
from hetero.cli import app
from hetero.errors import HeteroError
from hetero.plan import Plan, make_plan, rescore
from hetero.plan.batch import parse_batches, plan_batch

from tests.plan.helpers import MB, _m, cpu_machine, cpu_profile, toy_spec


def spec():
    # layers of ~5.9 MB in bf16: 8 ms from disk at 730 MB/s, 0.6 ms from RAM at 10 GB/s
    return toy_spec(layers=4, hidden=512, ffn=1408, heads=8, kv_heads=4, vocab=1000)


def profile(rows: float = 20e9):
    """cpu_profile with a measured row-kernel rate (FLOP/s at M rows) per precision."""
    p = cpu_profile()
    dev = dataclasses.replace(p.devices["cpu"], gemm_rows={k: _m(rows, "FLOP/s") for k in ("fp32", "bf16", "int8", "int4")})
    return dataclasses.replace(p, devices={"cpu": dev})


def plan(memory, batches="auto", **kw):
    return plan_batch(spec(), cpu_machine(), profile(), batches, memory=memory, precisions=["bf16"],
                      prompt_tokens=8, context=24, explain=False, **kw)


def test_row_rate_comes_from_the_profile_and_prices_only_batched_steps():
    s, hw = spec(), cpu_machine()
    slow, fast = cost.device_rates(hw, profile(5e9))["cpu"], cost.device_rates(hw, profile(50e9))["cpu"]
    assert slow.rows["bf16"] == 5e9 and fast.rows["bf16"] == 50e9
    full = s.unit_bytes("layers.0", "bf16")
    co = cost.Coefficients()

    def step(r, b):
        return cost.compute_time(s, "layers.0", r, "bf16", full, 1, 64, b, co)
    assert step(slow, 1) == step(fast, 1)          # one row: the GEMV path, no row kernel
    assert step(slow, 16) > 3 * step(fast, 16)     # 16 rows: compute-bound at the slow rate
    # without the probe (an older profile, a catalog machine) the rate falls back, never to zero
    assert cost.device_rates(hw, cpu_profile())["cpu"].rows["bf16"] > 0


def test_predicted_rates_are_monotone_in_the_batch():
    s, hw, pr = spec(), cpu_machine(), profile()
    base = make_plan(s, hw, pr, {"cpu": 20 * MB}, precisions=["bf16"], prompt_tokens=8, context=24)
    assert {u.residency for u in base.units} >= {"disk"}
    steps, rates = [], []
    for b in (1, 2, 4, 8, 16, 32):
        p = rescore(dataclasses.replace(base, batch=b, ragged=True), s, hw, pr)
        steps.append(p.predicted.decode_ms)
        rates.append(p.predicted.decode_tok_s)
        assert p.memory_breakdown["cpu"]["kv"] == b * base.memory_breakdown["cpu"]["kv"]
    assert steps == sorted(steps) and rates == sorted(rates)
    # a disk-bound step: 8 rows cost little more than one, so the rate is nearly 8x
    assert rates[3] > 6 * rates[0]


def test_more_rows_when_units_stream_from_disk():
    streamed = plan({"cpu": 20 * MB})
    resident = plan({"cpu": 2000 * MB})
    assert "disk" in {u.residency for u in streamed.units}
    assert {u.residency for u in resident.units} == {"resident"}
    assert streamed.batch >= 16 and streamed.batch > resident.batch
    best = max(o.decode_tok_s for o in streamed.batch_options if o.fits)
    chosen = next(o for o in streamed.batch_options if o.batch == streamed.batch)
    assert chosen.decode_tok_s >= 0.98 * best
    assert "batch 1's decode rate" in streamed.why.notes[0]


def test_latency_bound_and_memory_bound_batches():
    free = plan({"cpu": 20 * MB})
    one = next(o for o in free.batch_options if o.batch == 1)
    # more rows make a step longer: a bound between batch 1's step and the next leaves batch 1
    nxt = min(o.decode_ms for o in free.batch_options if o.fits and o.batch > 1)
    assert nxt > one.decode_ms
    tight = plan({"cpu": 20 * MB}, max_latency_ms=(one.decode_ms + nxt) / 2)
    assert free.batch > 1 and tight.batch == 1 and tight.max_latency_ms == (one.decode_ms + nxt) / 2
    assert all("over the" in o.note for o in tight.batch_options if o.fits and o.batch > 1)
    with pytest.raises(HeteroError, match="within"):
        plan({"cpu": 20 * MB}, max_latency_ms=one.decode_ms * 0.5)
    # KV for many long contexts does not fit a small budget: the largest sizes are marked, not chosen
    big = plan({"cpu": 20 * MB}, batches="1,8,256")
    opts = {o.batch: o for o in big.batch_options}
    assert big.batch != 256 and not opts[256].fits and opts[256].note


def test_batch_options_round_trip_and_parse():
    p = plan({"cpu": 20 * MB}, batches="1,8")
    q = Plan.from_json(p.to_json())
    assert q.batch_options == p.batch_options and q.ragged and q.batch == p.batch
    assert parse_batches("auto") == [1, 2, 4, 8, 16, 32] and parse_batches("32,1,8") == [1, 8, 32]
    for bad in ("0", "x", "1,,300"):
        with pytest.raises(HeteroError):
            parse_batches(bad)


def test_cli_shows_the_chosen_batch_and_every_size():
    r = CliRunner().invoke(app, ["plan", "synthetic:llama-7b", "--hardware", "catalog:rtx4090+ram64g+nvme",
                                 "--memory", "cuda:0=8GB", "--batch", "1,8", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    sizes = [o["batch"] for o in d["workload"]["batch_options"]]
    assert sizes == [1, 8] and d["workload"]["batch"] in sizes
    r = CliRunner().invoke(app, ["plan", "synthetic:llama-7b", "--hardware", "catalog:rtx4090+ram64g+nvme",
                                 "--batch", "2", "--max-latency-ms", "5"])
    assert r.exit_code != 0


def test_run_batch_auto_needs_prompts_and_sizes_are_checked(capsys):
    from hetero.cli import main

    for args, said in ((["--batch", "auto"], "--prompts"), (["--batch", "lots"], "--batch")):
        with pytest.raises(SystemExit) as e:
            main(["run", "synthetic:tiny", *args])
        assert e.value.code == 2 and said in capsys.readouterr().err
