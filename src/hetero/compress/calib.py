"""Calibration statistics: for every matmul weight, the Gram matrix of its inputs, XᵀX [K, K].

Collected in one fp32 pass over calibration text with forward hooks on the decoder's linear
modules. Fused modules (q|k|v, gate|up) see one input, so their parts share one matrix.
GPTQ uses H = 2 XᵀX / n; Wanda uses the column norms ‖X_j‖ = sqrt(diag XᵀX); AWQ mean |x_j| and
XᵀX / n (the layer-output error of a weight change dW is tr(dW XᵀX dWᵀ) / n).
"""
from __future__ import annotations

import torch

from hetero.compress.core import build_net, head_name
from hetero.progress import progress_bar

# Canonical weights fed by each fused module of a decoder layer.
_FUSED = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


class Gram:
    """Running XᵀX (fp64, so thousands of tokens add up exactly enough), Σ|x| per channel (AWQ's
    activation scale) and the token count."""

    def __init__(self, k: int):
        self.xtx = torch.zeros(k, k, dtype=torch.float64)
        self.abs_sum = torch.zeros(k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.xtx += x.T @ x
        self.abs_sum += x.abs().sum(dim=0)
        self.n += x.shape[0]

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    def hessian(self) -> torch.Tensor:
        return 2.0 * self.xtx / max(self.n, 1)

    def col_norms(self) -> torch.Tensor:
        return torch.sqrt(torch.diag(self.xtx)).float()


def collect(loaded, ids: list[int], context: int = 512, progress: bool = True,
            include_head: bool = True) -> dict[str, Gram]:
    """canonical weight name -> Gram of its inputs, over `ids` cut into windows of `context`."""
    spec = loaded.spec
    net = build_net(spec, loaded.tensors)
    grams: dict[str, Gram] = {}
    hooks = []

    def attach(module, names: list[str]) -> None:
        g = Gram(module.in_features)
        for nm in names:
            grams[nm] = g

        def hook(_m, inputs, _out):
            g.add(inputs[0].float())

        hooks.append(module.register_forward_hook(hook))

    for i, layer in enumerate(net.layers):
        for attr, parts in _FUSED.items():
            attach(getattr(layer, attr), [f"model.layers.{i}.{p}.weight" for p in parts])
    if include_head:
        attach(net.head, [head_name(spec)])
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    chunks = [ids_t[a:a + context] for a in range(0, len(ids), context)]
    cache = net.new_cache(1, context)
    try:
        with progress_bar("calibrating", len(chunks), enabled=progress) as advance:
            for c in chunks:
                net(c.unsqueeze(0), 0, cache, last_only=False)
                advance()
    finally:
        for h in hooks:
            h.remove()
    return grams
