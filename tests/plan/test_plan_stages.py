"""Planning a pipeline: make_plan over one stage's units, and the stages joined into one Plan whose
`stages` carry each rank's budgets (pure: toy specs and machines, no weights, no torch)."""
from __future__ import annotations

import pytest

from hetero.errors import HeteroError
from hetero.plan import make_plan
from hetero.plan.plan import Plan
from hetero.plan.stages import StageRequest, pipeline_plan
from tests.plan.helpers import MB, cpu_machine, cpu_profile, toy_spec


def test_stage_plan_covers_only_its_units():
    spec = toy_spec(layers=4)
    p = make_plan(spec, cpu_machine(), cpu_profile(), units=["layers.1", "layers.2", "layers.3", "head"],
                  prompt_tokens=8, context=16, explain=False)
    assert [u.name for u in p.units] == ["layers.1", "layers.2", "layers.3", "head"]
    whole = make_plan(spec, cpu_machine(), cpu_profile(), prompt_tokens=8, context=16, explain=False)
    # the stage holds its units' weights only: less than the whole model's
    assert p.memory_breakdown["cpu"]["weights"] < whole.memory_breakdown["cpu"]["weights"]


def test_stage_units_must_be_one_contiguous_run():
    spec = toy_spec(layers=4)
    with pytest.raises(HeteroError, match="not a contiguous run"):
        make_plan(spec, cpu_machine(), cpu_profile(), units=["layers.0", "layers.2"], explain=False)


def test_a_tied_embedding_alone_holds_its_own_table():
    # vocab 4096 x hidden 64: the table is 1 MB at fp32; with the head elsewhere the stage holds it whole
    spec = toy_spec(layers=2, vocab=4096, tied=True)
    alone = make_plan(spec, cpu_machine(), cpu_profile(), units=["embed", "layers.0"], precisions=["fp32"],
                      explain=False)
    layer = make_plan(spec, cpu_machine(), cpu_profile(), units=["layers.0"], precisions=["fp32"], explain=False)
    embed_bytes = alone.memory_breakdown["cpu"]["weights"] - layer.memory_breakdown["cpu"]["weights"]
    assert embed_bytes == 4096 * 64 * 4


def _requests(spec, budgets: list[int], reserve: int = 50 * MB):
    names = spec.unit_names()
    half = len(names) // 2
    return [StageRequest(r, "127.0.0.1", "cpu", tuple(units), cpu_machine(), cpu_profile(), {"cpu": b},
                         {"cpu": reserve}, send_s=1e-4)
            for r, (units, b) in enumerate(zip((names[:half], names[half:]), budgets))]


def test_pipeline_plan_streams_only_the_tight_rank():
    # layers of 9.44 MB at fp32 (hidden 512, ffn 1024): rank 1 (4 layers + a 1 MB head) needs 39.4 MB
    # resident, ~19.5 MB streaming (the prefetch pool); it may hold 30 MB beyond its 50 MB reserve
    spec = toy_spec(layers=8, hidden=512, ffn=1024, heads=8, kv_heads=4, vocab=512)
    p = pipeline_plan(spec, _requests(spec, [2000 * MB, 80 * MB]), prompt_tokens=16, context=32,
                      precisions=["fp32"])
    assert [u.name for u in p.units] == spec.unit_names()
    assert [(s.first, s.last, s.rank) for s in p.stages] == [("embed", "layers.3", 0), ("layers.4", "head", 1)]
    r0, r1 = p.stage_plan(0), p.stage_plan(1)
    assert all(u.residency == "resident" for u in r0.units)
    assert any(u.residency == "disk" for u in r1.units)
    for st in p.stages:  # each rank within its own budget, counted with its own reserve
        assert st.memory["cpu"] + st.reserve["cpu"] <= st.budgets["cpu"]
    assert p.over_budget() == {}
    assert Plan.from_json(p.to_json()) == p
    assert p.predicted.decode_ms == pytest.approx(sum(s.decode_ms + s.send_ms for s in p.stages))


def test_a_split_tied_embedding_takes_the_heads_precision():
    spec = toy_spec(layers=4, vocab=4096, tied=True)
    p = pipeline_plan(spec, _requests(spec, [2000 * MB, 2000 * MB]), prompt_tokens=16, context=32)
    assert p.unit("embed").precision == p.unit("head").precision
    pinned = pipeline_plan(spec, _requests(spec, [2000 * MB, 2000 * MB]), prompt_tokens=16, context=32,
                           precisions=["bf16", "fp32"])
    assert pinned.unit("embed").precision == pinned.unit("head").precision


def test_a_rank_with_no_stage_is_one_line():
    spec = toy_spec(layers=4)
    p = pipeline_plan(spec, _requests(spec, [2000 * MB, 2000 * MB]), prompt_tokens=16, context=32)
    with pytest.raises(HeteroError, match="no stage for rank 5"):
        p.stage_plan(5)
