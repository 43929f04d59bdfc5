"""Exact plans on toy models, with the byte arithmetic that decides them written out."""
from __future__ import annotations

import re

import pytest

from hetero.errors import HeteroError
from hetero.plan import make_plan
from tests.plan.helpers import cpu_machine, cpu_profile, gpu_machine, toy_spec

# toy_spec(): hidden 64, ffn 128, 4 heads x 16 (q 64), 2 kv heads (kv 32), vocab 256. bf16 bytes:
#   embed  [256, 64] x 2                                      = 32768
#   layer  (q 64x64 + k 32x64 + v 32x64 + o 64x64 + gate/up 128x64 x2 + down 64x128) x 2
#          = 36864 x 2 + two fp32 norms 2 x 64 x 4             = 74240
#   head   [256, 64] x 2 + fp32 norm 64 x 4                   = 33024
# KV cache: 2 (K,V) x 32 (kv dim) x 2 B = 128 B per token per layer; at context 32: 4096 per layer.
# Workspace at prompt 16, batch 1: 4 B x (16 x (3x64 + 64 + 2x32 + 2x128) + 4 heads x 16 x 16 + 256)
#                                 = 4 x (9216 + 1024 + 256) = 41984
EMBED, LAYER, HEAD, KV, WS = 32768, 74240, 33024, 4096, 41984
WL = dict(prompt_tokens=16, context=32)


def rows(plan):
    return [(u.name, u.device, u.precision, u.residency) for u in plan.units]


def test_everything_resident_when_it_fits():
    spec = toy_spec(layers=2)
    p = make_plan(spec, cpu_machine(), cpu_profile(), {"cpu": 10**6}, precisions=["bf16"], **WL)
    assert rows(p) == [("embed", "cpu", "bf16", "resident"), ("layers.0", "cpu", "bf16", "resident"),
                       ("layers.1", "cpu", "bf16", "resident"), ("head", "cpu", "bf16", "resident")]
    # 32768 + 2 x 74240 + 33024 + 2 x 4096 + 41984 = 264448
    assert p.memory["cpu"] == EMBED + 2 * LAYER + HEAD + 2 * KV + WS == 264448
    assert p.memory["disk"] == 0
    assert [u.bytes for u in p.units] == [EMBED, LAYER, LAYER, HEAD]


def test_one_byte_short_names_the_exact_budget():
    spec = toy_spec(layers=2)
    hw = cpu_machine()
    hw = type(hw)(hw.host, tuple(d for d in hw.devices if d.kind != "disk"), (), hw.source)  # no disk
    with pytest.raises(HeteroError) as e:
        make_plan(spec, hw, cpu_profile(), {"cpu": 264447}, precisions=["bf16"], **WL)
    assert "cpu=" in str(e.value) and "(264448 B;" in str(e.value)


def test_the_embedding_goes_to_disk_first():
    # 6 layers all resident: 32768 + 6 x 74240 + 33024 + 6 x 4096 + 41984 = 577792. One byte less:
    # a streamed unit needs a 2-deep staging pool in RAM, so a layer on disk frees 74240 but takes
    # 2 x 74240; the head frees 33024 but takes 2 x 33024; the embedding reads only the rows of a
    # 16-token prompt (pool 2 x 16 x 128 = 4096) and frees 32768: it alone can go.
    spec = toy_spec(layers=6)
    p = make_plan(spec, cpu_machine(), cpu_profile(), {"cpu": 577791}, precisions=["bf16"], **WL)
    assert rows(p)[0] == ("embed", "cpu", "bf16", "disk")
    assert all(r[3] == "resident" for r in rows(p)[1:])
    assert p.memory["cpu"] == 577792 - EMBED + 4096
    assert p.memory["disk"] == EMBED
    assert p.memory_breakdown["cpu"] == {"weights": 6 * LAYER + HEAD, "kv": 6 * KV, "buffers": 4096, "workspace": WS}
    assert p.why.binding and p.why.binding[0].startswith("cpu memory")


def test_int4_everywhere_without_a_quality_bound_and_int8_within_one():
    # decode streams weight bytes at one rate whatever the dtype, so the smallest bytes win;
    # the default sensitivity puts int4 at 0.03 and int8 at 0.002 for the whole model
    spec = toy_spec(layers=2)
    free = make_plan(spec, cpu_machine(), cpu_profile(), {"cpu": 10**6}, **WL)
    assert {u.precision for u in free.units} == {"int4"}
    assert free.predicted.quality_loss == pytest.approx(0.03)
    bounded = make_plan(spec, cpu_machine(), cpu_profile(), {"cpu": 10**6}, max_quality_loss=0.002, **WL)
    assert {u.precision for u in bounded.units} <= {"int8", "int4"}
    assert bounded.predicted.quality_loss <= 0.002 + 1e-12
    assert bounded.predicted.decode_tok_s < free.predicted.decode_tok_s


# mid-size toy on a GPU box: bf16 embed 4194304, layer 7868416, head 4196352; KV 32768 a layer at
# context 32; workspace 450560. GPU launches cost 8 us, the CPU streams ~9.9 GB/s, PCIe ~20 GB/s.
def mid():
    return toy_spec(layers=4, hidden=512, ffn=2048, heads=8, kv_heads=4, vocab=4096)


M_LAYER, M_KV, M_WS = 7868416, 32768, 450560


def test_gpu_takes_every_layer_and_the_embedding_stays_on_cpu():
    p = make_plan(mid(), gpu_machine(), None, {"cuda:0": 10**9, "cpu": 10**9}, precisions=["bf16"], **WL)
    # a lookup on the CPU (2 us) plus sending one hidden vector beats shipping token ids to the GPU
    assert rows(p)[0] == ("embed", "cpu", "bf16", "resident")
    assert all(r[1:] == ("cuda:0", "bf16", "resident") for r in rows(p)[1:])
    assert p.memory["cuda:0"] == 4 * M_LAYER + 4196352 + 4 * M_KV + M_WS


def test_streaming_from_ram_beats_the_cpu_when_the_pool_fits():
    # 20 MB of VRAM: a 2-deep pool of layers takes 2 x 7868416 = 15736832; with KV and workspace
    # 16.3 MB, no room is left for a resident layer, and all units stream over PCIe (~0.4 ms a layer,
    # against ~0.83 ms computing on the CPU)
    p = make_plan(mid(), gpu_machine(), None, {"cuda:0": 20_000_000, "cpu": 10**9}, precisions=["bf16"], **WL)
    assert [r[3] for r in rows(p)[1:]] == ["ram"] * 5
    assert p.memory_breakdown["cuda:0"] == {"weights": 0, "kv": 4 * M_KV, "buffers": 2 * M_LAYER, "workspace": M_WS}


def test_too_small_a_pool_leaves_one_resident_layer_on_the_gpu():
    # 12 MB of VRAM: no pool fits (15.7 MB); one layer + its KV + workspace = 8.35 MB does
    p = make_plan(mid(), gpu_machine(), None, {"cuda:0": 12_000_000, "cpu": 10**9}, precisions=["bf16"], **WL)
    assert [r[1] for r in rows(p)].count("cuda:0") == 1
    assert p.memory["cuda:0"] == M_LAYER + M_KV + M_WS
    assert all(r[3] == "resident" for r in rows(p))


def test_infeasible_message_names_budget_in_bytes():
    spec = toy_spec(layers=2)
    with pytest.raises(HeteroError) as e:
        make_plan(spec, cpu_machine(), cpu_profile(), {"cpu": 1000}, **WL)
    m = re.search(r"cpu=[0-9.]+ [KMG]?B \((\d+) B; have", str(e.value))
    assert m, str(e.value)
    need = int(m.group(1))
    p = make_plan(spec, cpu_machine(), cpu_profile(), {"cpu": need}, **WL)
    assert p.memory["cpu"] <= need


def test_only_a_cpu_offered_int4_holds_the_dequant_block():
    spec = toy_spec(layers=2)
    big = {"cpu": 10**9}
    with_int4 = make_plan(spec, cpu_machine(), cpu_profile(), big, precisions=["bf16", "int4"], **WL)
    bf16_only = make_plan(spec, cpu_machine(), cpu_profile(), big, precisions=["bf16"], **WL)
    extra = with_int4.memory_breakdown["cpu"]["workspace"] - bf16_only.memory_breakdown["cpu"]["workspace"]
    h, f, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    assert extra == 6 * min(1 << 20, max(2 * f * h, v * h, (spec.n_heads * spec.head_dim + 2 * spec.kv_dim) * h))
