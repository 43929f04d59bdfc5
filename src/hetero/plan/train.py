"""What a LoRA training step costs: memory (adapters, their grads and AdamW state, activations kept
for backward or recomputed) and time (forward + backward per unit). Pure: specs and a Plan in,
numbers out.

Time per micro-batch of N = batch × seq_len tokens, per layer, from the profile's rates:
    c   its GEMMs over the N tokens (cost.compute_terms: prefill-shaped, attention, dequantise, ops)
    e_f N × the forward's eager bytes (plan/train_bytes.py: norms, RoPE, casts, the LoRA side path,
        the GEMMs' fresh outputs) at the eager rate, its rank-r products at skinny_eff of it
    e_b the same for backward (every op's gradient: about twice its forward's bytes)
    forward f = c + e_f;  backward b = c (input gradients: the forward's FLOPs again) + attention's
    backward + e_b;  checkpointed: max(f, r) + max(f + b, r) (recompute, then backward: a streamed
    unit read twice);  kept: max(f, r) + b     (r: the unit's weight transfer, 0 if resident)
    head: its GEMM forward and input gradient, and the loss chunks' eager bytes
plus per optimiser step AdamW and clipping over the adapters (small tensors: per-op cost).
At 135M the eager bytes, not the FLOPs, are most of a step: pricing them at the streaming rate (or
leaving them out) predicted a tenth of the time measured.
"""
from __future__ import annotations

from dataclasses import dataclass

from hetero import cost
from hetero.cost import Coefficients
from hetero.plan import train_bytes as tb

PART_DIMS = {"q_proj": ("h", "q"), "k_proj": ("h", "kv"), "v_proj": ("h", "kv"), "o_proj": ("q", "h"),
             "gate_proj": ("h", "f"), "up_proj": ("h", "f"), "down_proj": ("f", "h")}
HEAD_ROWS = 128   # logits rows per loss chunk (finetune/step.py)


@dataclass(frozen=True)
class TrainCoefficients:
    """The few structural factors of the step's time (the rates come from the profile)."""
    # a rank-r product (x Aᵀ, · Bᵀ, their gradients) streams its operands at this fraction of an
    # elementwise op's rate: a GEMM kernel with an inner or outer dimension of r does little per byte
    skinny_eff: float = 0.5
    attn_bwd: float = 2.0         # attention's backward vs its forward (the scores recomputed)
    # the input gradient through a quantised matrix dequantises it (lora.dense_weight): bytes per weight
    dequant_bytes: float = 15.0
    optim_ops: int = 14           # AdamW and clipping: eager ops per adapter tensor per step
    optim_passes: int = 16        # and passes over its fp32 bytes


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
              coeffs: Coefficients | None = None, tc: TrainCoefficients | None = None) -> dict:
    """Predicted seconds of one optimiser step, and per unit (forward, backward) of one micro-batch."""
    coeffs = coeffs or Coefficients()
    tc = tc or TrainCoefficients()
    rates = cost.device_rates(hw, profile, coeffs)
    disk_bw = cost.disk_rate(hw, profile, coeffs)
    T, B = wl.seq_len, wl.batch
    N = T * B
    units, total = {}, 0.0
    for u in plan.units:
        if u.name == "embed":
            continue
        r = rates[u.device]
        a = 4 if u.precision == "fp32" else 2  # activation bytes (weight-only formats run bf16 activations)
        # the whole micro-batch as one prefill-shaped pass: [B·T, h] rows through each matrix
        t = cost.compute_terms(spec, u.name, r, u.precision, u.bytes, T, T, B, coeffs)
        c = max(t["gemm"], t["memory"]) + t["dequant"] + t["overhead"]
        link = cost.link(hw, profile, "cpu", u.device, coeffs) if "cpu" in rates else None
        tr = cost.transfer_time(spec, u.name, u.bytes, u.residency, u.device, T, B, disk_bw, link, coeffs)
        if u.name == "head":
            eager = N * tb.head_chunk(spec, a) / r.eager
            fwd, bwd = max(c + eager / 2, tr), c + eager / 2
        else:
            side = tb.side_path(spec, wl.targets, wl.rank, a)
            outs = tb.gemm_outputs(spec, a)
            skinny = r.eager * tc.skinny_eff
            e_f = N * (tb.base_forward(spec, a) + side["forward"] + outs["forward"]) / r.eager \
                + N * side["skinny_forward"] / skinny
            e_b = N * (tb.base_backward(spec, a) + side["backward"] + outs["backward"]) / r.eager \
                + N * side["skinny_backward"] / skinny
            deq = 0.0 if u.precision in ("fp32", "bf16", "fp16") else \
                tc.dequant_bytes * sum(cost.unit_matrices(spec, u.name)) / r.eager
            f = c + t["attention"] + e_f
            b = c + tc.attn_bwd * t["attention"] + e_b + deq
            fwd, bwd = (max(f, tr), max(f + b, tr)) if checkpoint else (max(f, tr), b)
        units[u.name] = (round(fwd, 6), round(bwd, 6))
        total += fwd + bwd
    cpu = rates.get("cpu") or next(iter(rates.values()))
    n_tensors = 2 * spec.n_layers * len(wl.targets)
    optim = n_tensors * tc.optim_ops * cpu.overhead \
        + tc.optim_passes * 4 * adapter_params(spec, wl.rank, wl.targets) / cpu.mem
    step = total * wl.grad_accum + optim
    return {"step_s": step, "micro_s": total, "optimizer_s": optim, "units": units,
            "tokens_s": wl.grad_accum * N / step if step else 0.0,
            "read_bytes": sum((2 if (checkpoint and u.name != "head") else 1) * u.bytes
                              for u in plan.units if u.residency != "resident" and u.name != "embed") * wl.grad_accum}
