"""The planner prices the KV cache by how it is stored: int8 (D + 2 bytes a token and head) against
bf16's 2D, so one budget fits ~2x the context; the choice travels in the plan's JSON."""
from __future__ import annotations

import dataclasses
import json

import pytest

from hetero import cost
from hetero.errors import HeteroError
from hetero.plan import Plan, make_plan
from tests.plan.helpers import cpu_machine, cpu_profile, toy_spec

WL = dict(prompt_tokens=16, context=1024, precisions=["bf16"])


def test_kv_bytes_by_dtype():
    spec = toy_spec(hidden=64, heads=4, kv_heads=2)          # head_dim 16
    per = {kd: cost.kv_bytes(spec, "layers.0", "bf16", 100, 3, kd) for kd in ("auto", "bf16", "fp32", "int8")}
    assert per["auto"] == per["bf16"] == 3 * 100 * 2 * 2 * 16 * 2
    assert per["fp32"] == 2 * per["bf16"]
    assert per["int8"] == 3 * 100 * 2 * 2 * (16 + 2)
    assert cost.kv_bytes(spec, "layers.0", "fp32", 100, 3) == per["fp32"]   # auto follows the layer
    assert spec.kv_bytes(100, "bf16", 3, "int8") == 2 * per["int8"]         # both layers
    with pytest.raises(HeteroError, match="KV dtype"):
        cost.kv_bytes(spec, "layers.0", "bf16", 100, 3, "q4")


def test_an_int8_plan_holds_about_twice_the_context_in_the_same_budget():
    spec = toy_spec(layers=4, hidden=256, heads=4, kv_heads=4)  # head_dim 64, as most models
    budget = {"cpu": 40 << 20, "disk": 0}   # weights stay resident: the placement is fixed
    b16 = make_plan(spec, cpu_machine(), cpu_profile(), budget, **WL)
    i8 = make_plan(spec, cpu_machine(), cpu_profile(), budget, kv_dtype="int8", **WL)
    kv16, kv8 = b16.memory_breakdown["cpu"]["kv"], i8.memory_breakdown["cpu"]["kv"]
    assert kv8 / kv16 == pytest.approx(66 / 128)
    c16, c8 = b16.kv_capacity(), i8.kv_capacity()
    assert c16["bytes"] == kv16 and c8["per_token"] * 1024 == kv8
    # the whole budget less weights and the rest, over the bytes a token costs
    assert c8["max_context"] / c16["max_context"] == pytest.approx(128 / 66, rel=0.01)
    assert c8["max_batch"] >= 2 * c16["max_batch"] - 1 > 0      # whole sequences: ~1.94x, floored
    # just under what bf16 holds fits in bf16; just over it, only in int8
    make_plan(spec, cpu_machine(), cpu_profile(), budget, **dict(WL, context=c16["max_context"] - 64))
    long = dict(WL, context=c16["max_context"] + 64)
    with pytest.raises(HeteroError):
        make_plan(spec, cpu_machine(), cpu_profile(), budget, **long)
    assert make_plan(spec, cpu_machine(), cpu_profile(), budget, kv_dtype="int8", **long).kv_dtype == "int8"


def test_kv_dtype_round_trips_in_the_json_and_is_checked():
    p = make_plan(toy_spec(), cpu_machine(), cpu_profile(), {"cpu": 64 << 20}, kv_dtype="int8", **WL)
    d = json.loads(p.to_json())
    assert d["workload"]["kv_dtype"] == "int8"
    assert Plan.from_json(p.to_json()) == p
    del d["workload"]["kv_dtype"]                             # a plan from before: its cache as the layers'
    assert Plan.from_dict(d).kv_dtype == "auto"
    d["workload"]["kv_dtype"] = "int2"
    with pytest.raises(HeteroError, match="kv_dtype"):
        Plan.from_dict(d)
    assert "KV cache: int8" in _text(p)
    assert dataclasses.replace(p, memory_breakdown={}).kv_capacity() is None


def _text(plan) -> str:
    from rich.console import Console

    c = Console(width=200, record=True)
    c.print(plan.explain())
    return c.export_text()
