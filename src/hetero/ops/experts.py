"""A MoE layer's routed experts, run with tokens grouped by expert.

One step gathers the tokens routed to each active expert (index_select), runs that expert's fused
gate/up and down linears on them as one matmul each, scales by the routing weight and adds the
result back (an accumulating index_put): E_active x 2 matmuls per step, never one per token. Each
expert's linears are hetero.ops linears, so every precision the dense layers run (fp32/bf16/int8/
int4/GGUF blocks, a GGUF file's own blocks at `native`) runs here too.
One decode token on the CPU (N = 1) at int8, int4 or a GGUF block type takes one compiled call for
its k experts instead (kernels' experts_ffn: grouped gate/up GEMV, SiLU, grouped down GEMV, weighted
sum), the same row kernels and rounding points as the per-expert path; a Python loop over k experts
of small GEMVs cost more than reading their weights. Several tokens (a prompt) take experts_rows:
each touched expert's weight rows are read once and passed by all of its tokens while in cache
(the batched step's row tiles), and each token gets the one-token kernel's bits, where the loop
dequantised every touched expert to a float matrix per pass for a GEMM of a handful of rows.
Shapes: N tokens, k experts per token, E experts, h hidden, f expert FFN.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from hetero.ops import kernels
from hetero.ops.linear import cat_rows, gemv_operands, make_linear

# up to this many tokens of a prompt, an expert runs through the row kernels (experts_rows: its weights
# read once, no dequantised copy); more amortise a dequantised weight and a bf16 GEMM, which runs at
# ~2x the row tiles' rate here at 512 rows (0.5 vs ~0.25 TFLOP/s on 2 cores) but costs a pass over the
# weight to make
GEMM_ROWS = 128
# kinds the grouped one-token kernel reads (kernels' experts_ffn)
GROUPED = ("int8", "int4", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k")
# a resident bank's per-expert kernel operands, found once (kept off the module: the tensor cache
# snapshots a module's attributes, and these are views of its tensors)
_OPERANDS: "weakref.WeakKeyDictionary[ExpertBank, list]" = weakref.WeakKeyDictionary()
# ... and its router bound with them for one decode token (ExpertsRouted): bank -> (router, object or None)
_ROUTED: "weakref.WeakKeyDictionary[ExpertBank, tuple]" = weakref.WeakKeyDictionary()


def expert(w, e: int, n_experts: int):
    """Expert e's matrix of a stacked weight: a float [E, rows, K] tensor, or a GGUF file's blocks of
    all E*rows rows (a BlockTensor, sliced without a copy)."""
    if isinstance(w, torch.Tensor):
        return w[e]
    r = w.shape[0] // n_experts
    return w.rows(e * r, (e + 1) * r)


class ExpertBank(torch.nn.Module):
    # A bank left on disk sets this (runtime/experts.py): fetch(*experts) binds their tensors before use.
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
        if x.device.type == "cpu":
            y = self._one_token(x, index, weight) if x.shape[0] == 1 else self._rows(x, index, weight)
            if y is not None:
                return y
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

    def _expert_operands(self, e: int) -> tuple | None:
        """((kind, weight, scales) of gate_up, of down) of expert e as experts_ffn reads them, or None."""
        got = []
        for lin in (self._modules[f"gate_up{e}"], self._modules[f"down{e}"]):
            op = gemv_operands(lin)
            if op is None or isinstance(op[0], list) or op[3].numel() or getattr(lin, "pad", 0):
                return None
            got.append(op[:3])
        return tuple(got)

    def _table(self) -> list:
        """A resident bank's experts' kernel operands (found once)."""
        table = _OPERANDS.get(self)
        if table is None:
            table = _OPERANDS[self] = [self._expert_operands(e) for e in range(self.n_experts)]
        return table

    def _kind(self, ops: list) -> int | None:
        """The one kind all these experts' operands share, when the grouped kernels read it."""
        if not ops or any(o is None for o in ops):
            return None
        kind = ops[0][0][0]
        if any(o[0][0] != kind or o[1][0] != kind for o in ops) or kind not in _grouped_codes():
            return None
        return kind

    def _rows(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """N tokens (a prompt) in compiled calls ([N, h]), or None where they do not apply. An expert
        with up to GEMM_ROWS tokens takes experts_rows: its weights read once for all of them, each
        token with the one-token kernel's bits (resident: one call for all such experts of the
        layer; streamed: one per expert as it is brought in, since the cache need not hold every
        expert a prompt touches). More tokens than that pay for a dequantised weight and a bf16
        GEMM (the per-expert linear's forward). A token's terms are added in ascending expert id
        (the GEMM experts' after the compiled call's, for a resident bank)."""
        k = kernels.get()
        if k is None or not hasattr(k, "experts_rows"):
            return None
        kk = index.shape[1]
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)                 # slots grouped by expert, ascending
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        tokens = (order // kk).contiguous()                      # the token of each grouped slot
        w = weight.reshape(-1)[order].float().contiguous()
        start = [0] * self.n_experts
        for e in range(1, self.n_experts):
            start[e] = start[e - 1] + counts[e - 1]
        x = x.contiguous()
        few = [e for e, c in enumerate(counts) if 0 < c <= GEMM_ROWS]
        many = [e for e, c in enumerate(counts) if c > GEMM_ROWS]
        out = None
        if self.fetch is None and few:
            table = self._table()
            ops = [table[e] for e in few]
            kind = self._kind(ops)
            if kind is None:
                return None
            sel = torch.cat([torch.arange(start[e], start[e] + counts[e]) for e in few])
            offsets = [0]
            for e in few:
                offsets.append(offsets[-1] + counts[e])
            out = k.experts_rows(x, kind, [o[0][1] for o in ops], [o[0][2] for o in ops], [o[1][1] for o in ops],
                                 [o[1][2] for o in ops], few, offsets, tokens[sel].contiguous(), w[sel].contiguous())
            few = []
        if out is None:
            out = torch.zeros_like(x)
        mods = self._modules
        done = False
        todo = sorted(few + many)
        for i, e in enumerate(todo):
            c, pos = counts[e], start[e]
            r = tokens[pos:pos + c]
            if self.fetch is not None and i % kk == 0:   # streamed: k at a time, their reads together
                self.fetch(*todo[i:i + kk])
            if c <= GEMM_ROWS:
                op = self._expert_operands(e)
                kind = self._kind([op])
                if kind is None:   # a bank's experts share one precision: the first one says
                    if done:
                        raise RuntimeError(f"expert {e} is not in the kind the bank's other experts are")
                    return None
                y = k.experts_rows(x.index_select(0, r), kind, [op[0][1]], [op[0][2]], [op[1][1]], [op[1][2]], [e],
                                   [0, c], torch.arange(c), w[pos:pos + c].contiguous())
            else:
                gate, up = mods[f"gate_up{e}"](x.index_select(0, r)).chunk(2, dim=-1)
                y = mods[f"down{e}"](F.silu(gate) * up)
                y = (y * w[pos:pos + c, None].to(y.dtype)).to(out.dtype)
            out.index_put_((r,), y, accumulate=True)
            done = True
        return out

    def routed(self, x: torch.Tensor, router: torch.Tensor, k: int, renormalise: bool) -> torch.Tensor | None:
        """One decode token's routing and its k experts in one compiled call (x [1, h] -> [1, h]),
        operands bound once (kernels' ExpertsRouted), or None where it does not apply (a streamed
        bank, a kind the kernels do not read): the caller routes in torch and calls forward."""
        if x.shape[0] != 1 or x.device.type != "cpu" or self.fetch is not None or x.dtype != self.dtype:
            return None
        got = _ROUTED.get(self)
        if got is None or got[0] is not router:
            kern = kernels.get()
            table = self._table() if kern is not None and hasattr(kern, "ExpertsRouted") else []
            kind = self._kind(table)
            obj = None
            if kind is not None and router.dtype == torch.float32 and router.is_contiguous() \
                    and router.device.type == "cpu" and router.shape[1] % 32 == 0:
                obj = kern.ExpertsRouted(router, k, renormalise, kind, [o[0][1] for o in table],
                                         [o[0][2] for o in table], [o[1][1] for o in table], [o[1][2] for o in table])
            got = _ROUTED[self] = (router, obj)
        return None if got[1] is None else got[1].step(x.reshape(-1).contiguous()).view(1, -1)

    def _one_token(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """One token's k experts in one compiled call ([1, h]), or None where it does not apply."""
        k = kernels.get()
        if k is None:
            return None
        ids = index[0].tolist()
        if self.fetch is not None:   # streamed: bind all k first (the cache holds >= 2k), read together
            self.fetch(*ids)
            ops = [self._expert_operands(e) for e in ids]
        else:
            table = self._table()
            ops = [table[e] for e in ids]
        kind = self._kind(ops)
        if kind is None:
            return None
        y = k.experts_ffn(x.reshape(-1).contiguous(), kind, [o[0][1] for o in ops], [o[0][2] for o in ops],
                          [o[1][1] for o in ops], [o[1][2] for o in ops], ids, weight[0].float().contiguous())
        return y.view(1, -1)


_CODES: set[int] = set()


def _grouped_codes() -> set[int]:
    """GROUPED's kind codes, as the loaded module numbers them."""
    if not _CODES:
        codes = kernels.kinds()
        _CODES.update(codes[n] for n in GROUPED if n in codes)
    return _CODES
