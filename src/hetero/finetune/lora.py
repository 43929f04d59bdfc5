"""LoRA adapters on hetero's own decoder layers, over frozen base linears of any precision.

A layer's linears are fused (qkv, gate_up): a `TrainLinear` wraps one and adds each targeted part's
low-rank update to that part's rows of the output,
    y = base(x) + concat_p(scale · x Aₚᵀ Bₚᵀ)        Aₚ: [r, in], Bₚ: [out_p, r]   (PEFT's LoRA)
Parts that are not targeted get no update. The base is frozen; `frozen_linear` still gives the input
gradient through it whatever its precision (a dense weight through autograd, a quantised one through
its weight dequantised in backward), so layers below the adapters get their gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hetero.errors import HeteroError
from hetero.ops.linear import DenseLinear, Int4Linear, Int8Linear, dequant_int4_rows

# PEFT's module names for the Llama family, and the fused hetero linear each one is part of.
PARTS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
         "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}
# every linear of a layer: adapting the MLP as well as attention is what lets a small adapter take a
# new domain (QLoRA's finding), at ~2.7x the attention-only adapter's size
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_path(name: str) -> str:
    """The HF module a PEFT target sits in: self_attn.q_proj, mlp.down_proj, ..."""
    return ("self_attn." if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.") + name


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        bad = [t for t in self.targets if t not in PARTS]
        if bad or not self.targets:
            raise HeteroError(f"unknown --targets {','.join(bad) or '(none)'}; known: {', '.join(PARTS)}")
        if self.rank < 1:
            raise HeteroError(f"--rank must be >= 1 (got {self.rank})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def part_sizes(spec, fused: str) -> list[int]:
    """Output rows of each part of a fused linear, in order."""
    return {"qkv": [spec.n_heads * spec.head_dim, spec.kv_dim, spec.kv_dim], "o": [spec.hidden_size],
            "gate_up": [spec.intermediate_size, spec.intermediate_size], "down": [spec.hidden_size]}[fused]


def in_size(spec, fused: str) -> int:
    return {"qkv": spec.hidden_size, "o": spec.n_heads * spec.head_dim, "gate_up": spec.hidden_size,
            "down": spec.intermediate_size}[fused]


_CACHE: dict | None = None  # id(base) -> dense weight, while `cached_weights()` is open


class cached_weights:
    """Keep each base's dequantised weight for the length of a block (the head's loss chunks)."""

    def __enter__(self):
        global _CACHE
        _CACHE = {}

    def __exit__(self, *exc):
        global _CACHE
        _CACHE = None


def dense_weight(base: torch.nn.Module) -> torch.Tensor:
    if _CACHE is None:
        return _dense_weight(base)
    if id(base) not in _CACHE:
        _CACHE[id(base)] = _dense_weight(base)
    return _CACHE[id(base)]


def _dense_weight(base: torch.nn.Module) -> torch.Tensor:
    """The frozen weight [out, in] as a float matrix, for the input gradient (dequantised, exact
    to what forward multiplies by)."""
    if isinstance(base, DenseLinear):
        return base.weight
    if isinstance(base, Int8Linear):
        q = base.qweight[:, :base.in_features]
        return (q.float() * base.scales.float()[:, None]).to(torch.bfloat16)
    if isinstance(base, Int4Linear) and base.layout == "rows":
        return dequant_int4_rows(base.packed, base.scales_zeros)[:, :base.in_features]
    if getattr(base, "segments", None) is not None:  # GGUF blocks: dequantised exactly
        return torch.cat([seg.dequantize() for seg in base.segments])
    # any other layout (GGUF blocks, torch's packings): the columns of W^T from the identity
    eye = torch.eye(base.in_features, dtype=torch.bfloat16, device=getattr(base, "device", "cpu"))
    w_t = base(eye)
    if getattr(base, "bias", None) is not None:
        w_t = w_t - base.bias.to(w_t.dtype)
    return w_t.t()


class _Frozen(torch.autograd.Function):
    """y = base(x) with dL/dx = dL/dy · W; nothing saved but the module (its weight stays bound)."""

    @staticmethod
    def forward(ctx, x, base):
        ctx.base = base
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx, g):
        w = dense_weight(ctx.base)
        return (g.to(w.dtype) @ w).to(g.dtype), None


def frozen_linear(base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(base, DenseLinear) and base.weight.dtype == x.dtype:
        return torch.nn.functional.linear(x, base.weight, base.bias)  # autograd's own, exact
    if not x.requires_grad:
        with torch.no_grad():
            return base(x)
    return _Frozen.apply(x, base)


class TrainLinear(torch.nn.Module):
    """A frozen fused linear plus the LoRA parts targeted in it (A, B fp32 parameters)."""

    def __init__(self, base: torch.nn.Module, sizes: list[int], parts: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 scale: float):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a child: the base owns frozen (maybe streamed) tensors
        self.sizes, self.scale = sizes, scale
        self.idx = sorted(parts)
        self.A = torch.nn.ParameterList([parts[i][0] for i in self.idx])
        self.B = torch.nn.ParameterList([parts[i][1] for i in self.idx])
        self.in_features, self.out_features = base.in_features, base.out_features
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_linear(self.base, x)
        if not self.idx or not self.enabled:
            return y
        xf = x.float()
        deltas = []
        for j, n in enumerate(self.sizes):
            if j in self.idx:
                k = self.idx.index(j)
                deltas.append((xf @ self.A[k].t()) @ self.B[k].t() * self.scale)       # [.., n]
            else:
                deltas.append(xf.new_zeros(*x.shape[:-1], n))
        d = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)
        return (y.float() + d).to(y.dtype)


def new_parts(spec, cfg: LoraConfig, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fresh adapter tensors keyed `layers.i.<target>`: A Kaiming-uniform as PEFT, B zero (starts at the base)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(spec.n_layers):
        for t in cfg.targets:
            fused, j = PARTS[t]
            k, n = in_size(spec, fused), part_sizes(spec, fused)[j]
            bound = 1.0 / math.sqrt(k)  # kaiming_uniform_(a=sqrt(5)) on [r, k]
            a = (torch.rand(cfg.rank, k, generator=gen) * 2 - 1) * bound
            out[f"layers.{i}.{t}"] = (a, torch.zeros(n, cfg.rank))
    return out


def layer_module(unit):
    """The decoder layer module behind a unit (a streamed unit's template)."""
    return getattr(unit, "template", unit)


def attach(net, spec, cfg: LoraConfig, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
           trainable: bool = True) -> list[torch.nn.Parameter]:
    """Wrap every linear of every layer of `net` (a Decoder) in a TrainLinear carrying its adapters;
    returns the adapter parameters (A, B per target, layer order)."""
    if spec.is_moe or spec.architecture not in ("llama", "mistral", "qwen2"):
        raise HeteroError(f"LoRA runs on Llama-family models (llama, mistral, qwen2), not {spec.architecture}")
    params: list[torch.nn.Parameter] = []
    for i, unit in zip(net.layer_ids, net.layers):
        layer = layer_module(unit)
        for fused, names in FUSED.items():
            base = getattr(layer, fused)
            base = getattr(base, "base", base)  # attach twice: the same frozen base
            parts = {}
            for j, t in enumerate(names):
                if (key := f"layers.{i}.{t}") in tensors:
                    a, b = (torch.nn.Parameter(v.detach().float().clone().to(layer.device), requires_grad=trainable)
                            for v in tensors[key])
                    parts[j] = (a, b)
                    params += [a, b]
            setattr(layer, fused, TrainLinear(base, part_sizes(spec, fused), parts, cfg.scale))
    net.stack_decode = False  # the compiled decode stack reads the base weights alone
    return params


def detach(net) -> None:
    """Put the plain base linears back (the model without its adapters)."""
    for unit in net.layers:
        layer = layer_module(unit)
        for fused in FUSED:
            lin = getattr(layer, fused)
            if isinstance(lin, TrainLinear):
                setattr(layer, fused, lin.base)
    net.stack_decode = True


def adapter_tensors(net) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapters now in `net`, keyed layers.i.<target> (as new_parts)."""
    out = {}
    for i, unit in zip(net.layer_ids, net.layers):
        layer = layer_module(unit)
        for fused, names in FUSED.items():
            lin = getattr(layer, fused)
            if isinstance(lin, TrainLinear):
                for k, j in enumerate(lin.idx):
                    out[f"layers.{i}.{names[j]}"] = (lin.A[k].detach(), lin.B[k].detach())
    return out
