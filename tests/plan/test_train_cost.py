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
