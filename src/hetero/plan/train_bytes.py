"""Bytes a LoRA training step's eager ops move, per token, counted from the ops finetune/step.py and
finetune/lora.py run (tests/plan/test_train_bytes.py checks them against a count of the real ops).

At 135M the step is not its GEMMs: each layer pass runs ~60-80 eager ops (norms in fp32, RoPE, casts,
the side path's scale, zeros, concatenation and add) over [tokens, dim] activations, each writing a
fresh buffer. Their bytes, at the profile's eager rate (cost.DeviceRates.eager), are most of the step.
Pure: a spec in, numbers out.
"""
from __future__ import annotations

# PEFT target -> (fused linear, its input dim, its output dim) in the dims of _dims
FUSED_PARTS = {"qkv": (("q_proj", "q"), ("k_proj", "kv"), ("v_proj", "kv")), "o": (("o_proj", "h"),),
               "gate_up": (("gate_proj", "f"), ("up_proj", "f")), "down": (("down_proj", "h"),)}
FUSED_IN = {"qkv": "h", "o": "q", "gate_up": "h", "down": "f"}


def dims(spec) -> dict[str, int]:
    return {"h": spec.hidden_size, "q": spec.n_heads * spec.head_dim, "kv": spec.kv_dim, "f": spec.intermediate_size}


def _cast(a: int, n: int) -> int:
    """x.float() (or back) over n elements: read a, write 4 bytes each; nothing when already fp32."""
    return (a + 4) * n if a != 4 else 0


def base_forward(spec, a: int) -> int:
    """One decoder layer's forward (step._layer), eager bytes per token, activations of `a` bytes."""
    d = dims(spec)
    h, q, kv, f = d["h"], d["q"], d["kv"], d["f"]
    norm = 28 * h + 2 * _cast(a, h)          # float, pow, mean, x*rsqrt, w*y, back: two per layer
    rope = 10 * a * (q + kv)                 # neg, cat, x*cos, rot*sin, add over q and k
    cache = 7 * a * kv                       # the fresh K/V cache zeroed, K and V written into it
    g = spec.n_heads // max(1, spec.n_kv_heads)
    repeat = 2 * a * (kv + q) if g > 1 else 0  # K, V repeated to every query head
    return 2 * norm + rope + cache + repeat + 2 * a * q + 6 * a * h + 5 * a * f  # + out transpose, residuals, SiLU·up


def base_backward(spec, a: int) -> int:
    """Its backward: every op's gradient reads the incoming gradient and what it saved and writes
    one more tensor: about twice the forward's bytes (counted: 2.0x on smollm2)."""
    return 2 * base_forward(spec, a)


def _fused_targets(targets) -> dict[str, list[str]]:
    return {fu: [dim for name, dim in parts if name in targets] for fu, parts in FUSED_PARTS.items()}


def side_path(spec, targets, rank: int, a: int) -> dict[str, int]:
    """The LoRA side path (lora.TrainLinear) per token: eager bytes forward and backward, and the bytes
    of its rank-r products (x A^T, · B^T and their gradients), which stream rather than compute."""
    d = dims(spec)
    fwd = bwd = skinny_f = skinny_b = 0
    for fu, hit in _fused_targets(set(targets)).items():
        if not hit:
            continue
        i = d[FUSED_IN[fu]]
        outs = [d[dim] for _, dim in FUSED_PARTS[fu]]
        O, Ot = sum(outs), sum(d[dim] for dim in hit)
        # x.float(); scale each delta; zeros for parts not adapted; cat; y.float() + d; back to a
        fwd += _cast(a, i) + 8 * Ot + 4 * (O - Ot) + (8 * O if len(outs) > 1 else 0) + 2 * _cast(a, O) + 12 * O
        # the casts' and the scale's gradients, the targets' input gradients summed, cast back, added in
        bwd += 2 * _cast(a, O) + 8 * Ot + 12 * i * (len(hit) - 1) + _cast(a, i) + 3 * a * i
        skinny_f += sum(4 * i + 8 * rank + 4 * d[dim] for dim in hit)
        skinny_b += sum(8 * i + 16 * rank + 8 * d[dim] for dim in hit)
    return {"forward": fwd, "backward": bwd, "skinny_forward": skinny_f, "skinny_backward": skinny_b}


def gemm_outputs(spec, a: int) -> dict[str, int]:
    """Bytes per token the base's GEMMs write (fresh buffers too): outputs forward, input grads backward."""
    d = dims(spec)
    h, q, kv, f = d["h"], d["q"], d["kv"], d["f"]
    return {"forward": a * (q + 2 * kv + h + 2 * f + h), "backward": a * (h + q + h + f)}


def head_chunk(spec, a: int) -> int:
    """The loss head per scored token (step.head_loss): its norm, the [rows, V] logits cast to fp32,
    log-softmax, and their gradients back to the input dtype."""
    V, h = spec.vocab_size, spec.hidden_size
    return 2 * (28 * h + 2 * _cast(a, h)) + a * V + (4 + a) * V + 8 * V + 12 * V + (4 + a) * V
