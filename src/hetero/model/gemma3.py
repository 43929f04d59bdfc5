"""The Gemma 3 decoder layer (text models: 270M, 1B, and the text stacks of the larger ones).

What differs from the Llama layer: RMSNorm on each head's q and k; norms after attention and after
the MLP as well as before them; GeGLU with tanh-GELU; attention scaled by query_pre_attn_scalar^-1/2;
and interleaved local layers that see only the last `sliding_window` positions, with their own RoPE
base (the Decoder hands each layer its table). The embedding is scaled by sqrt(hidden), in the
activation dtype as transformers does. Norm weights are held as the multiplier (HF's 1 + w, the form
GGUF stores); `from_hf` converts an HF checkpoint's w.

A local layer's KV cache is a ring of `window` slots (position p in slot p % window) when the run is
longer than the window, so its memory is bounded by the window, not the context.
Shapes: B batch, T new tokens, S attended positions, H query heads, K kv heads, D head dim.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from hetero.model.arch import Architecture
from hetero.model.llama import apply_rope, rms_norm
from hetero.model.spec import ModelSpec
from hetero.model.units import UnitConfig
from hetero.ops.linear import activation_dtype, cat_rows, make_linear


class Gemma3Layer(torch.nn.Module):
    def __init__(self, spec: ModelSpec, weights: Callable[[str], torch.Tensor], i: int, unit: UnitConfig):
        super().__init__()
        p = f"model.layers.{i}."
        self.spec, self.index, self.device = spec, i, unit.device
        self.dtype = activation_dtype(unit.precision)
        self.n_q, self.n_kv = spec.n_heads * spec.head_dim, spec.kv_dim
        self.window = spec.sliding_window if spec.is_sliding(i) else None
        qkv_w = cat_rows([weights(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        self.qkv = make_linear(qkv_w, None, unit.precision, unit.device)
        self.o = make_linear(weights(p + "self_attn.o_proj.weight"), None, unit.precision, unit.device)
        gate_up = cat_rows([weights(p + "mlp.gate_proj.weight"), weights(p + "mlp.up_proj.weight")])
        self.gate_up = make_linear(gate_up, None, unit.precision, unit.device)
        self.down = make_linear(weights(p + "mlp.down_proj.weight"), None, unit.precision, unit.device)

        def norm(name: str) -> torch.Tensor:
            return weights(p + name).float().to(unit.device)

        self.attn_norm, self.post_attn_norm = norm("input_layernorm.weight"), norm("post_attention_layernorm.weight")
        self.mlp_norm, self.post_mlp_norm = norm("pre_feedforward_layernorm.weight"), norm("post_feedforward_layernorm.weight")
        self.q_norm, self.k_norm = norm("self_attn.q_norm.weight"), norm("self_attn.k_norm.weight")
        self.scale = (spec.query_pre_attn_scalar or spec.head_dim) ** -0.5

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        spec, eps = self.spec, self.spec.norm_eps
        B, T, _ = x.shape
        h = rms_norm(x, self.attn_norm, eps)
        q, k, v = self.qkv(h).split([self.n_q, self.n_kv, self.n_kv], dim=-1)
        q = rms_norm(q.view(B, T, spec.n_heads, spec.head_dim), self.q_norm, eps).transpose(1, 2)     # [B, H, T, D]
        k = rms_norm(k.view(B, T, spec.n_kv_heads, spec.head_dim), self.k_norm, eps).transpose(1, 2)  # [B, K, T, D]
        v = v.view(B, T, spec.n_kv_heads, spec.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values, kpos = self._cache(k.to(k_cache.dtype), v.to(v_cache.dtype), start, k_cache, v_cache)
        attn = self._attention(q, keys, values, kpos, start)
        y = self.o(attn.transpose(1, 2).reshape(B, T, self.n_q)).to(x.dtype)
        x = x + rms_norm(y, self.post_attn_norm, eps)
        gate, up = self.gate_up(rms_norm(x, self.mlp_norm, eps)).chunk(2, dim=-1)
        y = self.down(F.gelu(gate, approximate="tanh") * up).to(x.dtype)
        return x + rms_norm(y, self.post_mlp_norm, eps)

    def _cache(self, k: torch.Tensor, v: torch.Tensor, start: int, k_cache: torch.Tensor, v_cache: torch.Tensor):
        """Write the new K/V and return what the new queries attend to: keys, values [B, K, S, D]
        and their positions [S] (None: positions 0..S-1 in order, no window cut needed)."""
        L, T, end = k_cache.shape[2], k.shape[2], start + k.shape[2]
        if end <= L:  # every position has its own slot (a global layer, or a run inside the window)
            k_cache[:, :, start:end], v_cache[:, :, start:end] = k, v
            lo = 0 if self.window is None else max(0, end - T + 1 - self.window)  # the first query's reach
            if T == 1:
                return k_cache[:, :, lo:end], v_cache[:, :, lo:end], None
            return k_cache[:, :, lo:end], v_cache[:, :, lo:end], torch.arange(lo, end, device=k.device)
        # A ring of L = window slots: the earlier positions the first query still sees, then the new ones.
        if T == 1:  # after the write the ring holds exactly the window start-L+1 .. start
            k_cache[:, :, start % L], v_cache[:, :, start % L] = k[:, :, 0], v[:, :, 0]
            return k_cache[:], v_cache[:], None  # a view of a tensor; a KV store reads back whole
        old = torch.arange(max(0, start - L + 1), start, device=k.device)
        keys = torch.cat([k_cache[:, :, old % L], k], dim=2)
        values = torch.cat([v_cache[:, :, old % L], v], dim=2)
        keep = torch.arange(max(start, end - L), end, device=k.device)   # the last L positions stay
        k_cache[:, :, keep % L], v_cache[:, :, keep % L] = k[:, :, keep - start], v[:, :, keep - start]
        return keys, values, torch.cat([old, torch.arange(start, end, device=k.device)])

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpos: torch.Tensor | None,
                   start: int) -> torch.Tensor:
        B, H, T, D = q.shape
        K = k.shape[1]
        G = H // K
        if T == 1 and kpos is None:
            # Decode: every key given is visible; grouped matmul-softmax-matmul without repeating K/V.
            scores = torch.matmul(q.view(B, K, G, D), k.transpose(-1, -2).to(q.dtype)) * self.scale  # [B, K, G, S]
            probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
            return torch.matmul(probs, v).view(B, H, 1, D).to(q.dtype)
        qpos = torch.arange(start, start + T, device=q.device)
        mask = kpos[None, :] <= qpos[:, None]                                            # [T, S] causal
        if self.window is not None:
            mask &= qpos[:, None] - kpos[None, :] < self.window
        if G > 1:
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=self.scale)


def build_layer(spec: ModelSpec, weights: Callable[[str], torch.Tensor], i: int, unit: UnitConfig) -> Gemma3Layer:
    return Gemma3Layer(spec, weights, i, unit)


def embed_scale(spec: ModelSpec) -> float:
    return math.sqrt(spec.hidden_size)


def from_hf(name: str, t: torch.Tensor) -> torch.Tensor:
    # HF's Gemma RMSNorm computes x * (1 + w): hetero holds the multiplier, as llama.cpp's GGUF does
    return t.float() + 1.0 if name.endswith("norm.weight") else t


# No compiled whole-stack decode yet: gemv.cpp's DecodeStack is the Llama layer (no q/k or post norms,
# SiLU, one RoPE table); Gemma decodes layer by layer.
ARCH = Architecture(name="gemma3", spec_names=("gemma3",), build_layer=build_layer, embed_scale=embed_scale,
                    from_hf=from_hf)
