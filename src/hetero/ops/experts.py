"""A MoE layer's routed experts, run with tokens grouped by expert.

One step gathers the tokens routed to each active expert (index_select), runs that expert's fused
gate/up and down linears on them as one matmul each, scales by the routing weight and adds the
result back (an accumulating index_put): E_active x 2 matmuls per step, never one per token. Each
expert's linears are hetero.ops linears, so every precision the dense layers run (fp32/bf16/int8/
int4/GGUF blocks, a GGUF file's own blocks at `native`) runs here too.
Shapes: N tokens, k experts per token, E experts, h hidden, f expert FFN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hetero.ops.linear import cat_rows, make_linear


def expert(w, e: int, n_experts: int):
    """Expert e's matrix of a stacked weight: a float [E, rows, K] tensor, or a GGUF file's blocks of
    all E*rows rows (a BlockTensor, sliced without a copy)."""
    if isinstance(w, torch.Tensor):
        return w[e]
    r = w.shape[0] // n_experts
    return w.rows(e * r, (e + 1) * r)


class ExpertBank(torch.nn.Module):
    # A bank left on disk sets this (runtime/experts.py): fetch(e) binds expert e's tensors before use.
    fetch = None

    def __init__(self, gate, up, down, n_experts: int, precision: str, device: str):
        """gate, up: [E, f, h]; down: [E, h, f] (floats, or a GGUF file's blocks of E*f / E*h rows)."""
        super().__init__()
        from hetero.ops.linear import activation_dtype

        self.n_experts = n_experts
        self.device, self.dtype = device, activation_dtype(precision)  # where hidden states must come
        # plain children gate_up{e} / down{e} (not a ModuleList: the tensor cache snapshots hetero
        # classes only)
        for e in range(self.n_experts):
            gate_up = cat_rows([expert(gate, e, n_experts), expert(up, e, n_experts)])
            self.add_module(f"gate_up{e}", make_linear(gate_up, None, precision, device))
            self.add_module(f"down{e}", make_linear(expert(down, e, n_experts), None, precision, device))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, h]; index [N, k] the experts each token is routed to; weight [N, k] their weights.
        Returns sum_j weight[n, j] * expert_{index[n, j]}(x[n]) as [N, h] in x's dtype."""
        k = index.shape[1]
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)             # slots grouped by expert
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        rows = order // k                                     # the token of each grouped slot
        w = weight.reshape(-1)[order]
        out = torch.zeros_like(x)
        mods = self._modules
        pos = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            r = rows[pos:pos + c]
            if self.fetch is not None:
                self.fetch(e)
            gate, up = mods[f"gate_up{e}"](x.index_select(0, r)).chunk(2, dim=-1)
            y = mods[f"down{e}"](F.silu(gate) * up)
            # rows are distinct within one expert (top-k picks distinct experts); index_put_ over
            # index_add_, whose parallel loop costs milliseconds per call on a busy CPU
            out.index_put_((r,), (y * w[pos:pos + c, None].to(y.dtype)).to(out.dtype), accumulate=True)
            pos += c
        return out
