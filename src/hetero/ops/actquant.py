"""Int8 activations for prefill: each Linear's input quantised per token (symmetric, dynamic), as a
W8A8 prefill GEMM would take it. Used to measure what int8 activations cost in quality
(`hetero eval --act-int8`) and, for int8 weights, to run the real int8 x int8 product.

    with act_int8(net):          # every Linear of the decoder layers (head=True: the head too)
        logits = net(ids, 0, cache, last_only=False)

Why the head is left out by default: a generation's prefill runs the head on the prompt's last token
only, a one-row product that no W8A8 GEMM takes; only perplexity runs it over every token.

Per token t of x [.., K]: s_t = max|x_t| / 127, q_t = round(x_t / s_t) clipped to ±127 (int8).
Int8 weights (per output channel, Int8Linear) multiply q directly: torch._int_mm gives the exact
int32 sums, scaled by s_t x s_n, so the result is what a W8A8 kernel computes. Other weights (bf16,
GGUF blocks) take q x s_t, the dequantised activation, in the input's dtype: a bf16 input then
rounds the grid value to bf16 again (relative 2^-9), below the int8 step for all but the smallest
elements of a token. Decode steps (one token) are left alone: the option prices prefill.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

QMAX = 127


def quantize_per_token(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (q [M, K] int8, scale [M] fp32) with x2 ≈ q * scale[:, None]."""
    xf = x2.float()
    scale = xf.abs().amax(dim=-1).clamp(min=1e-12) / QMAX
    q = torch.round(xf / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def fake_quant(x: torch.Tensor, group: int = 0) -> torch.Tensor:
    """x [.., K] through the int8 grid, back in x's dtype: one scale per token (group 0), or per
    `group` consecutive elements of a token (llama.cpp's Q8 activation blocks are 32)."""
    k = x.shape[-1]
    g = group if group and k % group == 0 else k
    q, s = quantize_per_token(x.reshape(-1, g))
    return (q.float() * s[:, None]).to(x.dtype).reshape(x.shape)


def int8_mm(x2: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] (float) @ (qweight [N, K] int8 x wscale [N]).T with x2 quantised per token: the
    int32 sums of torch._int_mm, scaled, in fp32 [M, N]. K must be a multiple of 8 (torch's rule)."""
    q, s = quantize_per_token(x2)
    acc = torch._int_mm(q, qweight.t()).float()  # exact int32 sums
    return acc * s[:, None] * wscale.float()[None, :]


def _linears(net, head: bool = False) -> list[torch.nn.Module]:
    from hetero.ops.linear import DenseLinear, Int4Linear, Int8Linear
    from hetero.ops.native import NativeLinear

    kinds = (DenseLinear, Int8Linear, Int4Linear, NativeLinear)
    skip = set() if head else {id(m) for m in getattr(net, "head", torch.nn.Module()).modules()}
    return [m for m in net.modules() if isinstance(m, kinds) and id(m) not in skip]


def _pre_hook(group: int):
    def hook(_m, args):
        x = args[0]
        if x.dim() < 2 or x.numel() == x.shape[-1]:  # one token: a decode step, not prefill
            return None
        return (fake_quant(x, group), *args[1:])
    return hook


@contextmanager
def act_int8(net, group: int = 0, head: bool = False) -> Iterator[int]:
    """Within the block every Linear of `net`'s layers (and of its head when `head`) takes int8
    activations on prefill-shaped inputs (one scale per token, or per `group` elements); yields how
    many Linears that is. Int8 weights with
    per-token activations run the int8 x int8 product itself (one scale per row of each operand)."""
    from hetero.ops.linear import Int8Linear

    handles, flagged = [], []
    for m in _linears(net, head):
        if not group and isinstance(m, Int8Linear) and m.qweight.device.type == "cpu":
            m.act_int8 = True
            flagged.append(m)
        else:
            handles.append(m.register_forward_pre_hook(_pre_hook(group)))
    try:
        yield len(handles) + len(flagged)
    finally:
        for h in handles:
            h.remove()
        for m in flagged:
            m.act_int8 = False


def int8_linear_w8a8(lin, x: torch.Tensor) -> torch.Tensor:
    """Int8Linear's prefill with int8 activations: [.., K] -> [.., N] bf16 (the layer's output dtype)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if lin.pad:
        x2 = F.pad(x2, (0, lin.pad))
    y = int8_mm(x2, lin.qweight, lin.scales)
    if lin.bias is not None:
        y = y + lin.bias.float()
    return y.to(torch.bfloat16).reshape(*shape[:-1], lin.out_features)
