"""The Llama-family decoder layer (Llama 2/3, Mistral, Qwen2, SmolLM): where the model is defined.

Lean by design: fused QKV and gate/up projections, a preallocated KV cache written in place, and
linear layers whose kernel (fp32/bf16/int8/int4) and device are chosen per unit by the caller.
Shapes: B batch, T new tokens, S cached positions, H query heads, K kv heads, D head dim.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from hetero.model.arch import Architecture
from hetero.model.kvstore import Int8KV, nbytes as kv_nbytes, new_store
from hetero.model.paged import Ragged
from hetero.model.spec import ModelSpec
from hetero.model.units import UnitConfig
from hetero.ops import kernels
from hetero.ops.linear import activation_dtype, cat_rows, gemv_operands, make_linear


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """RoPE inverse frequencies, with llama3 or linear scaling applied as transformers does."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = spec.rope_scaling
    if rs is None:
        return inv.float()
    if rs.type == "linear":
        return (inv / rs.factor).float()
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    wl = 2 * math.pi / inv
    scaled = torch.where(wl > low_wl, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    mid = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_mid = (wl >= high_wl) & (wl <= low_wl)
    return torch.where(is_mid, mid, scaled).float()


class RotaryTable:
    """cos/sin for every position up to the cache length, computed once."""

    def __init__(self, spec: ModelSpec, max_len: int, device: str = "cpu"):
        pos = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(pos, rope_inv_freq(spec))            # [L, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)                  # [L, D]
        self.cos, self.sin = emb.cos().to(device), emb.sin().to(device)
        self._by_kind: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, start: int, length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        # Converted once per (dtype, device), then sliced: no conversion or copy per token.
        key = (dtype, str(device))
        if key not in self._by_kind:
            self._by_kind[key] = (self.cos.to(device=device, dtype=dtype), self.sin.to(device=device, dtype=dtype))
        c, s = self._by_kind[key]
        return c[start:start + length], s[start:start + length]

    def at(self, positions: torch.Tensor, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [N, D] for arbitrary positions (a ragged step: each row its own position)."""
        c, s = self.get(0, self.cos.shape[0], dtype, device)
        return c[positions], s[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [T, D]; rotate_half pairs dim i with i + D/2 (HF convention).
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Computed in fp32 as the reference implementations do; returned in the input dtype.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * y).to(x.dtype)


class KVCache:
    """Preallocated per-layer K and V: [B, K, L, D], written in place, never reallocated. L is max_len,
    or fewer slots for a layer that never looks further back (a local layer's window, used as a ring).
    kv_dtype other than the layers' own: each is a model/kvstore store (int8 codes + scales, or a cast)."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, dtypes: list[torch.dtype], devices: list[str],
                 lengths: list[int] | None = None, kv_dtype: str = "auto"):
        self.max_len, self.kv_dtype = max_len, kv_dtype
        self.lengths = list(lengths) if lengths is not None else [max_len] * len(dtypes)
        shapes = [(batch, spec.n_kv_heads, n, spec.head_dim) for n in self.lengths]
        self.k = [new_store(s, kv_dtype, dt, dev) for s, dt, dev in zip(shapes, dtypes, devices)]
        self.v = [new_store(s, kv_dtype, dt, dev) for s, dt, dev in zip(shapes, dtypes, devices)]
        # what the compiled decode step reads: "plain" tensors in the layers' dtypes, or "int8" stores
        # (codes + scales) in every layer; "cast" (another float dtype) runs layer by layer
        kinds = {"int8" if isinstance(t, Int8KV) else "plain" if isinstance(t, torch.Tensor) else "cast"
                 for t in self.k}
        self.kind = kinds.pop() if len(kinds) == 1 else "cast"
        self.plain = self.kind == "plain"

    def nbytes(self) -> int:
        return sum(kv_nbytes(t) for t in self.k + self.v)


class DecoderLayer(torch.nn.Module):
    def __init__(self, spec: ModelSpec, weights: Callable[[str], torch.Tensor | None], i: int, unit: UnitConfig):
        super().__init__()
        p = f"model.layers.{i}."
        self._init_attention(spec, weights, p, unit)
        gate_up = cat_rows([weights(p + "mlp.gate_proj.weight"), weights(p + "mlp.up_proj.weight")])
        self.gate_up = make_linear(gate_up, None, unit.precision, unit.device)
        self.down = make_linear(weights(p + "mlp.down_proj.weight"), None, unit.precision, unit.device)
        # Decode (one token) runs its small ops fused in the compiled kernels when they exist.
        self._fused = kernels.get() if (torch.device(unit.device).type == "cpu" and spec.head_dim % 16 == 0
                                        and self.dtype in (torch.float32, torch.bfloat16)) else None

    # Per-head RMSNorm weights of q and k (Qwen3-MoE sets them; model/moe.py), None: no q/k norm.
    q_norm = k_norm = None

    def _init_attention(self, spec: ModelSpec, weights: Callable, p: str, unit: UnitConfig) -> None:
        """The attention half of a layer (shared with model/moe.py): fused QKV, output, the two norms."""
        self.spec, self.device, self.dtype = spec, unit.device, activation_dtype(unit.precision)
        self.n_q, self.n_kv = spec.n_heads * spec.head_dim, spec.kv_dim
        qkv_w = cat_rows([weights(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        qkv_b = None
        if spec.attention_bias:
            qkv_b = torch.cat([weights(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        self.qkv = make_linear(qkv_w, qkv_b, unit.precision, unit.device)
        self.o = make_linear(weights(p + "self_attn.o_proj.weight"), None, unit.precision, unit.device)
        self.attn_norm = weights(p + "input_layernorm.weight").float().to(unit.device)
        self.mlp_norm = weights(p + "post_attention_layernorm.weight").float().to(unit.device)
        self.scale = 1.0 / math.sqrt(spec.head_dim)

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, ragged: Ragged | None = None) -> torch.Tensor:
        """One contiguous cache ([B, K, L, D], all rows at `start`), or with `ragged` a packed step
        of several sequences over paged KV (`k_cache`/`v_cache` are the pool's [n, block, K, D])."""
        if ragged is not None:
            return self._forward_ragged(x, ragged, cos, sin, k_cache, v_cache)
        B, T, _ = x.shape
        plain = isinstance(k_cache, torch.Tensor)
        if T == 1 and B == 1 and self._fused is not None and x.dtype == self.dtype == k_cache.dtype \
                and x.is_contiguous() and (not plain or (k_cache.is_contiguous() and v_cache.is_contiguous())):
            return self._decode_fused(x, start, cos, sin, k_cache, v_cache)
        x = self._attend(x, start, cos, sin, k_cache, v_cache)
        return x + self._mlp(rms_norm(x, self.mlp_norm, self.spec.norm_eps)).to(x.dtype)

    def _attend(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """x + attention(norm(x)), the new K/V written to the cache."""
        B, T, _ = x.shape
        attn = self._attend_qkv(self.qkv(rms_norm(x, self.attn_norm, self.spec.norm_eps)), start, cos, sin,
                                k_cache, v_cache)
        return x + self.o(attn.transpose(1, 2).reshape(B, T, self.n_q)).to(x.dtype)

    def _attend_qkv(self, qkv: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache, v_cache) -> torch.Tensor:
        """Attention [B, H, T, D] of the fused projection's output qkv [B, T, (H + 2K) D], the new K/V
        written to the cache (a tensor or a model/kvstore store: both take the same indexing)."""
        spec = self.spec
        B, T, _ = qkv.shape
        q, k, v = qkv.split([self.n_q, self.n_kv, self.n_kv], dim=-1)
        q = q.view(B, T, spec.n_heads, spec.head_dim)
        k = k.view(B, T, spec.n_kv_heads, spec.head_dim)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, spec.norm_eps), rms_norm(k, self.k_norm, spec.norm_eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                            # [B, H, T, D], [B, K, T, D]
        v = v.view(B, T, spec.n_kv_heads, spec.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        end = start + T
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v
        return self._attention(q, k_cache[:, :, :end], v_cache[:, :, :end], start)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def _forward_ragged(self, x: torch.Tensor, r: Ragged, cos: torch.Tensor, sin: torch.Tensor,
                        k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        # x: [1, N, h] the step's tokens packed; cos/sin: [N, D] each row at its own position.
        # Every linear runs once with M = N rows; only attention is per sequence.
        spec, H, K, D = self.spec, self.spec.n_heads, self.spec.n_kv_heads, self.spec.head_dim
        N = x.shape[1]
        # the fused row ops where the one-token path uses them: fewer ops, and its rounding points
        f = self._fused if self._fused is not None and x.dtype == self.dtype and x.is_contiguous() else None
        h = f.rmsnorm(x, self.attn_norm, spec.norm_eps) if f else rms_norm(x, self.attn_norm, spec.norm_eps)
        q, k, v = self._grouped(self.qkv, h, r)[0].split([self.n_q, self.n_kv, self.n_kv], dim=-1)
        q = apply_rope(q.reshape(N, H, D), cos[:, None], sin[:, None])                 # [N, H, D]
        k = apply_rope(k.reshape(N, K, D), cos[:, None], sin[:, None])                 # [N, K, D]
        # k_pool/v_pool: [n_blocks, K, block, D]; each new token to (its block, its offset)
        k_pool[r.write_blocks, :, r.write_offsets] = k.to(k_pool.dtype)
        v_pool[r.write_blocks, :, r.write_offsets] = v.reshape(N, K, D).to(v_pool.dtype)
        out = torch.empty(N, H, D, dtype=v_pool.dtype, device=x.device)
        if r.decode_blocks is not None and self._fused is None and x.device.type == "cpu":
            # no compiled ops: the one-token path attends with _attention over exactly its own keys,
            # so each row does the same here (the padded batch below would round otherwise)
            for j, row in enumerate(r.decode_rows.tolist()):
                end = int(r.positions[row]) + 1
                blocks = r.decode_blocks[j, :-(-end // r.block)]
                ks = k_pool[blocks].transpose(0, 1).reshape(K, -1, D)[None, :, :end]    # [1, K, S, D]
                vs = v_pool[blocks].transpose(0, 1).reshape(K, -1, D)[None, :, :end]
                qs = q[row:row + 1].to(k_pool.dtype).transpose(0, 1)[None]              # [1, H, 1, D]
                out[row] = self._attention(qs, ks, vs, end - 1)[0, :, 0]
        elif r.decode_blocks is not None:  # every one-token row together, padding masked
            Bd, nb = r.decode_blocks.shape
            G, bs = H // K, r.block
            qd = q[r.decode_rows].to(k_pool.dtype).view(Bd, 1, K, G, D)
            kd, vd = k_pool[r.decode_blocks], v_pool[r.decode_blocks]                   # [Bd, nb, K, bs, D]
            scores = torch.matmul(qd, kd.transpose(-1, -2)) * self.scale                # [Bd, nb, K, G, bs]
            scores = scores.permute(0, 2, 3, 1, 4).reshape(Bd, K, G, nb * bs)
            probs = torch.softmax(scores.float() + r.decode_bias, dim=-1).to(vd.dtype)
            probs = probs.view(Bd, K, G, nb, bs).permute(0, 3, 1, 2, 4)                 # [Bd, nb, K, G, bs]
            out[r.decode_rows] = torch.matmul(probs, vd).sum(1, dtype=torch.float32).to(out.dtype).view(Bd, H, D)
        for row, T, start, blocks in r.chunks:  # a prefill chunk attends alone, causally, over its own KV
            end = start + T
            qs = q[row:row + T].to(k_pool.dtype).transpose(0, 1)[None]                  # [1, H, T, D]
            ks = k_pool[blocks].transpose(0, 1).reshape(K, -1, D)[None, :, :end]        # [1, K, S, D]
            vs = v_pool[blocks].transpose(0, 1).reshape(K, -1, D)[None, :, :end]
            out[row:row + T] = self._attention(qs, ks, vs, start)[0].transpose(0, 1)
        y = self._grouped(self.o, out.view(1, N, self.n_q), r).to(x.dtype)
        if f:
            x, h = f.add_rmsnorm(x, y.contiguous(), self.mlp_norm, spec.norm_eps)
            act = f.silu_mul(self._grouped(self.gate_up, h, r).contiguous())
        else:
            x = x + y
            h = rms_norm(x, self.mlp_norm, spec.norm_eps)
            gate, up = self._grouped(self.gate_up, h, r).chunk(2, dim=-1)
            act = F.silu(gate) * up
        return x + self._grouped(self.down, act, r).to(x.dtype)

    @staticmethod
    def _grouped(linear, x: torch.Tensor, r: Ragged) -> torch.Tensor:
        # x: [1, N, in]: the decode rows in one call (M = B: the weight read once for all; `rows`
        # where the linear has a small-M kernel), each prefill chunk as its own forward gives it
        # alone; a GGUF linear (`grouped`) shares its weight reads across the groups, bits unchanged
        if len(r.groups) > 1 and hasattr(linear, "grouped"):
            return linear.grouped(x, r.groups)
        rows = getattr(linear, "rows", linear)
        parts = [(rows if dec and b - a > 1 else linear)(x[:, a:b]) for a, b, dec in r.groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _decode_fused(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        # Same math as the general path (which stays the reference), in 9 ops instead of ~35:
        # norm, qkv, rope+cache write+attention, o, add+norm, gate_up, silu*mul, down, add.
        spec, f = self.spec, self._fused
        h = f.rmsnorm(x, self.attn_norm, spec.norm_eps)
        qkv = self.qkv(h)
        if qkv.dtype != x.dtype or not qkv.is_contiguous():
            qkv = qkv.to(x.dtype).contiguous()
        if isinstance(k_cache, torch.Tensor):
            attn = f.decode_attention(qkv, cos, sin, k_cache, v_cache, start, spec.n_heads, spec.n_kv_heads,
                                      spec.head_dim, self.scale)
        else:  # a KV store (int8 codes): rope, write and attention in torch, read back dequantised
            attn = self._attend_qkv(qkv, start, cos, sin, k_cache, v_cache)
        y = self.o(attn.reshape(1, 1, self.n_q))
        x, h = f.add_rmsnorm(x, y if y.dtype == x.dtype else y.to(x.dtype), self.mlp_norm, spec.norm_eps)
        y = self.down(f.silu_mul(self.gate_up(h)))
        return x + (y if y.dtype == x.dtype else y.to(x.dtype))

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        B, H, T, D = q.shape
        K = k.shape[1]
        G = H // K
        if T == 1:
            # Decode: grouped matmul-softmax-matmul without repeating K/V (faster than SDPA at M=1).
            qg = q.view(B, K, G, D)
            scores = torch.matmul(qg, k.transpose(-1, -2)) * self.scale        # [B, K, G, S]
            probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
            return torch.matmul(probs, v).view(B, H, 1, D)
        if G > 1:
            k = k.repeat_interleave(G, dim=1)
            v = v.repeat_interleave(G, dim=1)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        S = k.shape[2]
        # Chunked prefill after a cache: query t sees keys up to start + t.
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def compile_decode_stack(layers: list) -> object | None:
    """The compiled decode step for the whole stack of decoder layers (one call per token; gemv.cpp,
    DecodeStack), or None when any layer cannot run in it: not a resident CPU DecoderLayer with the
    fused ops, activation dtypes that differ, or a linear without a compiled GEMV. The stack reads
    the layers' own weight tensors (no copy)."""
    if not layers or any(type(layer) is not DecoderLayer or layer._fused is None for layer in layers):
        return None
    first = layers[0]
    if any(layer.dtype != first.dtype or torch.device(layer.device).type != "cpu" for layer in layers):
        return None
    spec = first.spec
    stack = first._fused.DecodeStack(spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.hidden_size,
                                     first.down.in_features, spec.norm_eps, first.scale,
                                     first.dtype == torch.bfloat16)
    for layer in layers:
        ops = [gemv_operands(lin) for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        if any(op is None for op in ops):
            return None
        kinds, w, s, b = (list(t) for t in zip(*ops))
        stack.add_layer(kinds, w, s, b, layer.attn_norm.contiguous(), layer.mlp_norm.contiguous())
    return stack


def build_layer(spec: ModelSpec, weights: Callable[[str], torch.Tensor], i: int, unit: UnitConfig) -> DecoderLayer:
    return DecoderLayer(spec, weights, i, unit)


ARCH = Architecture(name="llama", spec_names=("llama", "mistral", "qwen2"), build_layer=build_layer,
                    compile_decode=compile_decode_stack, ragged=True)
