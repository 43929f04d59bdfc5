"""One micro-batch's forward and backward over the frozen base, unit by unit.

With checkpointing (the default, and the only way when a unit streams) each layer's input is kept
([B, T, h] per layer) and the forward runs without a graph; backward walks the layers in reverse,
recomputing each one's forward with a graph, then its backward. A streamed unit is held (its
prefetcher buffer bound) for exactly one forward and one recompute+backward, so the prefetchers run
in the order layers 0..N-1, head, layers N-1..0 (runtime.engine's "train" order). Without it every
layer's graph is kept from forward to backward (all units resident).
The head's loss runs in row chunks, so [rows, V] logits never exist for the whole batch.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from hetero.finetune.lora import cached_weights, frozen_linear, layer_module
from hetero.model.llama import rms_norm
from hetero.runtime.stream import StreamedUnit, bind, unbind

HEAD_ROWS = 128   # logits rows per loss chunk: [128, V] fp32 (plan/train.py prices it)


@contextlib.contextmanager
def held(unit):
    """The unit's module with its weights in memory for the whole block (a streamed unit's buffer stays bound)."""
    if not isinstance(unit, StreamedUnit):
        yield unit
        return
    slot = unit.prefetcher.get(unit.name)
    try:
        bind(unit.tree, unit.slots, slot.data())
        yield unit.template
    finally:
        unbind(unit.tree, unit.slots, unit._empty)
        unit.prefetcher.release(slot)


def _layer(net, layer, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    spec = net.spec
    cos, sin = net.rope.get(0, T, layer.dtype, layer.device)
    # a fresh cache the length of the sequence: the layer's own prefill path, unchanged
    kc = torch.zeros(B, spec.n_kv_heads, T, spec.head_dim, dtype=layer.dtype, device=layer.device)
    return layer(x, 0, cos, sin, kc, torch.zeros_like(kc))


def embed(net, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = net.embed[ids.to(net.embed.device)]
        if net.embed_scale is not None:
            x = x.to(net.embed_dtype) * torch.tensor(net.embed_scale, dtype=torch.float32).to(x.dtype)
    return x


def head_loss(net, x: torch.Tensor, targets: torch.Tensor, denom: float) -> tuple[float, torch.Tensor | None]:
    """Sum of next-token NLL over `targets` != -100 (x: [B, T, h], targets [B, T]); backward of
    loss/denom into x.grad. Returns (nll sum, x.grad)."""
    xl = x.detach().requires_grad_(True)
    h = xl.reshape(-1, x.shape[-1])
    t = targets.reshape(-1).to(h.device)
    rows = (t != -100).nonzero().flatten()
    total = 0.0
    with held(net.head) as head, cached_weights():
        for a in range(0, rows.numel(), HEAD_ROWS):
            r = rows[a:a + HEAD_ROWS]
            hh = h[r].to(net.head_device)
            if getattr(head, "computes_in_input_dtype", False) or hasattr(head, "logits"):
                hh = hh.float()
            z = frozen_linear(head, rms_norm(hh, net.norm, net.spec.norm_eps)).float()      # [rows, V]
            nll = F.cross_entropy(z, t[r].to(z.device), reduction="sum")
            (nll / denom).backward()
            total += float(nll.detach())
    return total, xl.grad


def forward_backward(net, ids: torch.Tensor, targets: torch.Tensor, denom: float, checkpoint: bool = True) -> float:
    """ids, targets: [B, T] (targets -100 where nothing is scored). Adds d(loss/denom)/dθ to the adapters'
    .grad; returns the NLL sum."""
    T = ids.shape[1]
    net._ensure_rope(T)
    x = embed(net, ids)
    kept: list[torch.Tensor] = []
    for unit in net.layers:
        with held(unit) as layer:
            x = x.to(device=layer.device, dtype=layer.dtype)
            if checkpoint:
                kept.append(x)
                with torch.no_grad():
                    x = _layer(net, layer, x)
            else:
                x = _layer(net, layer, x)
    nll, g = head_loss(net, x, targets, denom)
    if not checkpoint:
        if x.requires_grad:
            x.backward(g.to(x.dtype))
        return nll
    for unit, xi in zip(reversed(net.layers), reversed(kept)):
        with held(unit) as layer:
            xi = xi.detach().requires_grad_(g is not None and xi is not kept[0])
            y = _layer(net, layer, xi)
            if y.requires_grad:
                y.backward(g.to(device=y.device, dtype=y.dtype))
            g = xi.grad if xi.requires_grad else None
    return nll


def layer_modules(net) -> list:
    return [layer_module(u) for u in net.layers]
