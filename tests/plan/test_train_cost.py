"""The planner's training cost (plan/train.py): exact adapter sizes on a toy spec, and the orderings
that make checkpointing a trade (less memory, more time)."""
from __future__ import annotations

from hetero.model.sources import resolve_spec
from hetero.plan.train import TrainWorkload, adapter_params, layer_graph_bytes, train_memory


def test_adapter_params_exact():
    spec = resolve_spec("synthetic:tiny")  # h 64, 4 heads of 16, 2 kv heads (kv 32), ffn 176, 2 layers
    # q: r(64+64), v: r(64+32), down: r(176+64); r = 8, 2 layers
    assert adapter_params(spec, 8, ("q_proj", "v_proj", "down_proj")) == 2 * 8 * (128 + 96 + 240)


def test_checkpointing_holds_less():
    spec = resolve_spec("synthetic:tiny")
    wl = TrainWorkload(seq_len=128, batch=4, grad_accum=1, rank=8, targets=("q_proj", "v_proj"))
    kept, ckpt = train_memory(spec, wl, False), train_memory(spec, wl, True)
    assert ckpt["activations"] < kept["activations"]
    assert kept["activations"] >= spec.n_layers * layer_graph_bytes(spec, 512)
    p = adapter_params(spec, 8, ("q_proj", "v_proj"))
    assert (kept["adapters"], kept["grads"], kept["adamw"]) == (4 * p, 4 * p, 8 * p)


def _priced(targets, checkpoint, accum=1):
    from hetero.finetune.plan_train import plan_training
    from hetero.plan.train import step_time
    from hetero.runtime.engine import _machine

    spec = resolve_spec("synthetic:tiny")
    wl = TrainWorkload(seq_len=64, batch=2, grad_accum=accum, rank=8, targets=targets)
    plan, _, _, _ = plan_training("synthetic:tiny", spec, wl, None, ["fp32"], checkpoint)
    hw, prof = _machine(None)
    return step_time(spec, plan, hw, prof, wl, checkpoint)


def test_step_time_prices_recompute_backward_and_the_side_path():
    attn, every = ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    kept, ckpt = _priced(attn, False), _priced(attn, True)
    assert ckpt["step_s"] > kept["step_s"]                       # the recompute
    f, b = ckpt["units"]["layers.0"]
    assert b > f                                                 # recompute + backward cost more than the forward
    assert _priced(every, True)["micro_s"] > ckpt["micro_s"]     # more adapted matrices, more side path
    two = _priced(attn, True, accum=2)
    assert abs(two["step_s"] - (2 * two["micro_s"] + two["optimizer_s"])) < 1e-12
