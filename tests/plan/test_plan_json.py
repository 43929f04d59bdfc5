"""Plan JSON: the round trip, hand edits priced again, refusals, and budget parsing."""
from __future__ import annotations

import dataclasses
import json

import pytest

from hetero.errors import HeteroError
from hetero.plan import Plan, check_plan, make_plan, parse_memory, rescore
from hetero.plan.units import parse_bytes
from tests.plan.helpers import cpu_machine, cpu_profile, gpu_machine, toy_spec

WL = dict(prompt_tokens=16, context=32)


def small_plan():
    return make_plan(toy_spec(layers=6), cpu_machine(), cpu_profile(), {"cpu": 577791}, precisions=["bf16"], **WL)


def test_round_trip_is_exact_and_has_the_promised_keys(tmp_path):
    p = small_plan()
    d = json.loads(p.to_json())
    for key in ("version", "model", "hardware", "workload", "budgets", "units", "memory", "predicted", "why"):
        assert key in d
    assert set(d["units"][0]) >= {"name", "device", "precision", "residency", "bytes", "predicted_ms"}
    assert set(d["predicted"]) >= {"prefill_tok_s", "decode_tok_s"}
    assert Plan.from_json(p.to_json()) == p
    p.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == p


def test_unit_times_add_up_to_the_step():
    p = make_plan(toy_spec(layers=3, hidden=512, ffn=2048, heads=8, kv_heads=4, vocab=4096), gpu_machine(),
                  None, {"cuda:0": 20_000_000}, **WL)
    # per-unit figures are rounded to the nanosecond
    assert sum(u.predicted_ms for u in p.units) == pytest.approx(p.predicted.decode_ms, abs=1e-5)
    assert sum(u.prefill_ms for u in p.units) == pytest.approx(p.predicted.prefill_ms, abs=1e-5)


def test_hand_edit_is_priced_again():
    spec = toy_spec(layers=6)
    p = small_plan()
    d = p.to_dict()
    d["units"][0]["residency"] = "resident"  # bring the embedding back from disk
    edited = rescore(Plan.from_dict(d), spec, cpu_machine(), cpu_profile())
    assert edited.memory["cpu"] == p.memory["cpu"] + 32768 - 4096   # + embed, - its staging pool
    assert edited.over_budget() == {"cpu": 1}                       # one byte over, as designed
    assert edited.predicted.decode_tok_s > p.predicted.decode_tok_s


@pytest.mark.parametrize("field,value,needle", [("residency", "gpu", "residency"), ("precision", "int3", "precision")])
def test_bad_unit_fields_are_refused(field, value, needle):
    d = small_plan().to_dict()
    d["units"][1][field] = value
    with pytest.raises(HeteroError, match=needle):
        Plan.from_dict(d)


def test_newer_version_and_garbage_are_refused():
    d = small_plan().to_dict()
    with pytest.raises(HeteroError, match="version"):
        Plan.from_dict({**d, "version": 99})
    with pytest.raises(HeteroError, match="not a valid plan"):
        Plan.from_dict({"version": 1, "units": [{}]})
    with pytest.raises(HeteroError, match="JSON"):
        Plan.from_json("{")


def test_plan_for_another_model_or_machine_is_refused():
    p = small_plan()
    with pytest.raises(HeteroError, match="made for toy"):
        check_plan(p, toy_spec(layers=5, name="other"))
    moved = dataclasses.replace(p, units=tuple(dataclasses.replace(u, device="cuda:0") for u in p.units))
    with pytest.raises(HeteroError, match="cuda:0"):
        check_plan(moved, toy_spec(layers=6), cpu_machine())


def test_parse_memory_units_and_percentages():
    spec = toy_spec(layers=2)
    bf16 = spec.total_bytes("bf16")
    m = parse_memory("cpu=2GB, cuda:0=4GiB,disk=50%", spec)
    assert m == {"cpu": 2 * 10**9, "cuda:0": 4 << 30, "disk": bf16 // 2}
    assert parse_bytes("1.5MiB") == 1572864 and parse_bytes("123") == 123 and parse_bytes("1e9") == 10**9
    for bad in ("cpu", "cpu=lots", "cpu=1GB,cpu=2GB", "=1GB", "cpu=3XB"):
        with pytest.raises(HeteroError):
            parse_memory(bad, spec)
    with pytest.raises(HeteroError, match="percentage"):
        parse_bytes("10%")


def test_unknown_budget_device_and_reserve():
    spec = toy_spec(layers=2)
    with pytest.raises(HeteroError, match="no memory device 'cuda:3'"):
        make_plan(spec, cpu_machine(), cpu_profile(), {"cuda:3": 10**9}, **WL)
    base = make_plan(spec, cpu_machine(), cpu_profile(), {"cpu": 10**6}, **WL)
    res = make_plan(spec, cpu_machine(), cpu_profile(), {"cpu": 10**6}, reserve={"cpu": 10**6 - base.memory["cpu"]}, **WL)
    assert res.memory["cpu"] + res.reserve["cpu"] <= 10**6 and not res.over_budget()
    with pytest.raises(HeteroError, match="runtime itself"):
        make_plan(spec, cpu_machine(), cpu_profile(), {"cpu": 10**6}, reserve={"cpu": 2 * 10**6}, **WL)


