"""GGUF block formats as planner precisions: their true bytes, `native` pricing, where each may run."""
from __future__ import annotations

import dataclasses

import numpy as np

from hetero import cost
from hetero.dtypes import GGML_BLOCKS, storage_bytes, weight_bytes
from hetero.hardware.types import Measurement
from hetero.plan.make import make_plan
from hetero.plan.table import Workload, build_table
from tests.plan.helpers import cpu_machine, cpu_profile, toy_spec


def _stored(spec, types: dict[str, str]):
    """`spec` with matrices stored as GGML types: {suffix of a tensor name: type}, first match wins."""
    out = []
    for t in spec.tensors:
        typ = next((v for k, v in types.items() if t.name.endswith(k)), t.dtype) if len(t.shape) == 2 else "F32"
        out.append(dataclasses.replace(t, dtype=typ, nbytes=storage_bytes(typ, t.shape)))
    return dataclasses.replace(spec, tensors=tuple(out), format="gguf")


def _profile_with_blocks(rates: dict[str, float]):
    p = cpu_profile()
    dev = p.devices["cpu"]
    m = lambda x, u: Measurement(median=x, min=x, max=x, unit=u)  # noqa: E731
    gemv = {**dev.gemv_bandwidth, **{k: m(v, "B/s") for k, v in rates.items()}}
    gemm = {**dev.gemm_flops, **{k: m(150e9, "FLOP/s") for k in rates}}
    return dataclasses.replace(p, devices={"cpu": dataclasses.replace(dev, gemv_bandwidth=gemv, gemm_flops=gemm)})


def test_block_bytes_are_the_formats_own():
    # [256, 512]: 4096 blocks of 32 -> Q4_0 18 B each; Q4_K 512 blocks of 256 at 144 B
    assert weight_bytes("q4_0", (256, 512)) == 256 * 16 * 18
    assert weight_bytes("q4_k", (256, 512)) == 256 * 2 * 144
    assert weight_bytes("native", (256, 512), stored="Q6_K") == 256 * 2 * 210
    assert weight_bytes("native", (256, 512), stored="F16") == 256 * 512 * 2  # dense stored: bf16
    assert weight_bytes("native", (512,), stored="F32") == 512 * 4           # norms stay fp32
    for t, (per, size) in GGML_BLOCKS.items():
        if per > 1 and t.lower() in ("q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"):
            assert weight_bytes(t.lower(), (8, 1024)) == 8 * 1024 // per * size


def test_native_means_the_file_and_is_offered_only_for_one():
    dense = toy_spec(hidden=256, ffn=512)
    assert "native" not in dense.runnable_precisions() and "q4_k" not in dense.runnable_precisions()
    assert {"q8_0", "q4_0", "q4_1"} <= set(dense.runnable_precisions())
    mixed = _stored(dense, {"v_proj.weight": "Q6_K", "down_proj.weight": "Q6_K", "": "Q4_K"})
    assert mixed.has_block_tensors and "native" in mixed.runnable_precisions()
    assert mixed.unit_bytes("layers.0", "native") == mixed.unit_stored_bytes("layers.0")
    assert mixed.native_format("layers.0") == "q4_k"          # most of the layer's bytes
    assert not mixed.stored_as("layers.0", "q4_k")            # v and down are Q6_K
    rates = cost.device_rates(cpu_machine(), _profile_with_blocks({"q4_k": 20e9, "q6_k": 15e9}))["cpu"]
    assert "native" in rates.precisions
    assert rates.rate_precision(mixed, "layers.0", "native") == "q4_k"
    assert rates.rate_precision(mixed, "layers.0", "q5_k") in ("q6_k", "q4_k")  # nearest measured


def test_a_format_hetero_cannot_quantise_to_runs_only_where_stored():
    spec = _stored(toy_spec(hidden=256, ffn=512), {"embed_tokens.weight": "Q6_K", "": "Q4_K"})
    prof = _profile_with_blocks({"q4_k": 20e9, "q6_k": 15e9, "q4_0": 20e9})
    table = build_table(spec, cpu_machine(), prof, Workload(prompt_tokens=16, context=24),
                        precisions=["q4_k", "q6_k", "q4_0", "native"])
    for k, ch in enumerate(table.choices):
        col = dict(zip(table.units, table.valid[:, k]))
        if ch.precision == "q4_k":
            assert not col["embed"] and col["layers.0"] and col["head"]
        if ch.precision == "q6_k":
            assert col["embed"] and not col["layers.0"]
        if ch.precision in ("q4_0", "native"):
            assert all(col.values())


def test_native_costs_nothing_in_quality_and_wins_a_tie():
    """A file's own Q4_1 against hetero's int4 (same 20 bytes per 32 weights, same measured rate):
    the plan keeps the file's numbers."""
    spec = _stored(toy_spec(hidden=256, ffn=512), {"": "Q4_1"})
    prof = _profile_with_blocks({"q4_1": 10e9})
    plan = make_plan(spec, cpu_machine(), prof, precisions=["int4", "native"], prompt_tokens=16, context=24)
    layers = [u for u in plan.units if u.name.startswith("layers.")]
    assert layers and all(u.precision == "native" for u in layers)
    assert np.isclose(weight_bytes("native", (512, 256), stored="Q4_1"), weight_bytes("int4", (512, 256)))
