"""What a LoRA training step costs: memory (adapters, their grads and AdamW state, activations kept
for backward or recomputed) and time (forward + backward per unit). Pure: specs and a Plan in,
numbers out.

Time per micro-batch, per unit u with forward compute c_u and weight transfer r_u (0 if resident):
    layer, checkpointed:   max(c, r) [forward]  +  max(3c, r) [recompute + backward, read again]
    layer, kept:           max(c, r)            +  2c
    head:                  3c (forward, and its input gradient ≈ 2× forward) in one read
Backward of a frozen base is its input gradient (≈ the forward's FLOPs) plus the adapters' own small
products; the factor 2 counts both at the forward's rate, the usual 2× rule for a frozen matmul.
"""
from __future__ import annotations

from dataclasses import dataclass

from hetero import cost
from hetero.cost import Coefficients

PART_DIMS = {"q_proj": ("h", "q"), "k_proj": ("h", "kv"), "v_proj": ("h", "kv"), "o_proj": ("q", "h"),
             "gate_proj": ("h", "f"), "up_proj": ("h", "f"), "down_proj": ("f", "h")}
HEAD_ROWS = 128   # logits rows per loss chunk (finetune/step.py)


@dataclass(frozen=True)
class TrainWorkload:
    seq_len: int
    batch: int
    grad_accum: int
    rank: int
    targets: tuple[str, ...]


def _dims(spec) -> dict[str, int]:
    return {"h": spec.hidden_size, "q": spec.n_heads * spec.head_dim, "kv": spec.kv_dim, "f": spec.intermediate_size}


def adapter_params(spec, rank: int, targets) -> int:
    d = _dims(spec)
    return spec.n_layers * sum(rank * (d[PART_DIMS[t][0]] + d[PART_DIMS[t][1]]) for t in targets)


def layer_graph_bytes(spec, tokens: int) -> int:
    """Activations one layer's backward holds for `tokens` rows (fp32, an upper estimate): the
    normed inputs, q/k/v (and rotated copies), the attention output, gate, up, their product."""
    d = _dims(spec)
    per_token = 4 * d["h"] + 3 * (d["q"] + 2 * d["kv"]) + 2 * d["q"] + 4 * d["f"]
    return 4 * tokens * per_token


def train_memory(spec, wl: TrainWorkload, checkpoint: bool, quantised: bool = True) -> dict[str, int]:
    """Bytes beyond the base's weights that a training step holds at its peak, by kind."""
    p = adapter_params(spec, wl.rank, wl.targets)
    tokens = wl.batch * wl.seq_len
    hidden = 4 * tokens * spec.hidden_size
    graph = layer_graph_bytes(spec, tokens)
    d = _dims(spec)
    # the input gradient of a quantised matrix dequantises it for the call: the largest one at a time
    deq = 4 * max(d["f"] * d["h"] * 2, d["h"] * (d["q"] + 2 * d["kv"])) if quantised else 0
    # a chunk holds ~5 [rows, V] fp32 tensors: logits in bf16 and fp32, log-softmax, its grad, the bf16 grad
    head = 4 * HEAD_ROWS * spec.vocab_size * 5 + (4 * spec.vocab_size * spec.hidden_size if quantised else 0)
    return {"adapters": 4 * p, "grads": 4 * p, "adamw": 8 * p,
            "activations": (spec.n_layers + 2) * hidden + graph if checkpoint else spec.n_layers * graph + 2 * hidden,
            "workspace": max(deq, head)}


def step_time(spec, plan, hw, profile, wl: TrainWorkload, checkpoint: bool,
              coeffs: Coefficients | None = None) -> dict:
    """Predicted seconds of one optimiser step, and per unit (forward, backward) of one micro-batch."""
    coeffs = coeffs or Coefficients()
    rates = cost.device_rates(hw, profile, coeffs)
    disk_bw = cost.disk_rate(hw, profile, coeffs)
    T, B = wl.seq_len, wl.batch
    units, total = {}, 0.0
    for u in plan.units:
        if u.name == "embed":
            continue
        r = rates[u.device]
        c = cost.compute_time(spec, u.name, r, u.precision, u.bytes, T, T, B, coeffs)
        link = cost.link(hw, profile, "cpu", u.device, coeffs) if "cpu" in rates else None
        tr = cost.transfer_time(spec, u.name, u.bytes, u.residency, u.device, T, B, disk_bw, link, coeffs)
        if u.name == "head":
            fwd, bwd = max(c, tr), 2 * c
        elif checkpoint:
            fwd, bwd = max(c, tr), max(3 * c, tr)
        else:
            fwd, bwd = max(c, tr), 2 * c
        units[u.name] = (round(fwd, 6), round(bwd, 6))
        total += fwd + bwd
    return {"step_s": total * wl.grad_accum, "micro_s": total, "units": units,
            "tokens_s": wl.grad_accum * B * T / (total * wl.grad_accum) if total else 0.0,
            "read_bytes": sum((2 if (checkpoint and u.name != "head") else 1) * u.bytes
                              for u in plan.units if u.residency != "resident" and u.name != "embed") * wl.grad_accum}
