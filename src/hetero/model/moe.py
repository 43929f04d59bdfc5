"""Mixture-of-experts decoder layers: Mixtral, Qwen2-MoE and Qwen3-MoE.

The attention half is the Llama layer's (Qwen3-MoE adds RMSNorm on each head's q and k); the MLP is
a router over routed experts: softmax over all experts' logits, the top k kept (Mixtral and
`norm_topk_prob` renormalise them to sum 1, which is a softmax over the top-k logits), and the
tokens run grouped by expert (hetero.ops.experts). Qwen2-MoE adds a shared expert every token runs,
scaled by sigmoid(shared_expert_gate . h). The router runs in fp32 whatever the unit's precision:
it is tiny and the top-k choice is sensitive to rounding.
Shapes: B batch, T new tokens, N = B*T tokens, E experts, k experts per token, h hidden.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from hetero.model.arch import Architecture
from hetero.model.llama import DecoderLayer, rms_norm
from hetero.model.spec import ModelSpec
from hetero.model.units import UnitConfig
from hetero.ops import kernels
from hetero.ops.experts import ExpertBank
from hetero.ops.linear import cat_rows, make_linear


def _floats(w) -> torch.Tensor:
    """An fp32 matrix (a router stored in blocks is dequantised: llama.cpp keeps them F32, not all do)."""
    return w.float() if isinstance(w, torch.Tensor) else w.dequantize().float()


def route(logits: torch.Tensor, k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (weights [N, k] fp32, expert ids [N, k]), as transformers routes."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    if renormalise:
        top = top / top.sum(dim=-1, keepdim=True)
    return top, idx


class MoELayer(DecoderLayer):
    def __init__(self, spec: ModelSpec, weights: Callable[[str], torch.Tensor], i: int, unit: UnitConfig):
        torch.nn.Module.__init__(self)
        p = f"model.layers.{i}."
        self._init_attention(spec, weights, p, unit)
        self._fused = None   # the compiled decode stack fuses a dense MLP: a MoE layer steps in Python
        # ... but its one-token attention half takes the fused decode ops (_decode_moe)
        self._fused_attn = kernels.get() if (torch.device(unit.device).type == "cpu" and spec.head_dim % 16 == 0
                                             and self.dtype in (torch.float32, torch.bfloat16)) else None
        dev, prec = unit.device, unit.precision
        if spec.architecture == "qwen3_moe":
            self.q_norm = weights(p + "self_attn.q_norm.weight").float().to(dev)
            self.k_norm = weights(p + "self_attn.k_norm.weight").float().to(dev)
        self.router = _floats(weights(p + "mlp.gate.weight")).to(dev)                      # [E, h]
        self.k = spec.experts_per_token
        self.renormalise = spec.architecture == "mixtral" or spec.norm_topk_prob
        # the routed experts are a unit of their own (`layers.i.experts`, build_experts): the
        # assembler attaches them (attach_experts), on their own device and precision
        self.experts = None
        self.shared = None
        if spec.shared_expert_ffn:
            s = p + "mlp.shared_expert."
            self.shared = make_linear(cat_rows([weights(s + "gate_proj.weight"), weights(s + "up_proj.weight")]),
                                      None, prec, dev)
            self.shared_down = make_linear(weights(s + "down_proj.weight"), None, prec, dev)
            # [1, h] (a GGUF holds it as a vector [h])
            self.shared_gate = _floats(weights(p + "mlp.shared_expert_gate.weight")).reshape(1, -1).to(dev)

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, ragged=None) -> torch.Tensor:
        if ragged is None and x.shape[0] == 1 and x.shape[1] == 1 and self._fused_attn is not None \
                and x.dtype == self.dtype == k_cache.dtype and x.is_contiguous() and k_cache.is_contiguous() \
                and v_cache.is_contiguous():
            return self._decode_moe(x, start, cos, sin, k_cache, v_cache)
        return super().forward(x, start, cos, sin, k_cache, v_cache, ragged)

    def _decode_moe(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        # The general path's math with the dense layer's fused decode ops (norm, rope + cache write +
        # attention, add + norm): ~35 torch ops a layer fewer, which at 16 layers is milliseconds a token.
        spec, f = self.spec, self._fused_attn
        h = f.rmsnorm(x, self.attn_norm, spec.norm_eps)
        qkv = self.qkv(h)
        if qkv.dtype != x.dtype or not qkv.is_contiguous():
            qkv = qkv.to(x.dtype).contiguous()
        if self.q_norm is not None:   # Qwen3: RMSNorm per head of q and k, before rope
            q, k, v = qkv.view(-1).split([self.n_q, self.n_kv, self.n_kv])
            qkv = torch.cat([f.rmsnorm(q.view(spec.n_heads, spec.head_dim), self.q_norm, spec.norm_eps).view(-1),
                             f.rmsnorm(k.view(spec.n_kv_heads, spec.head_dim), self.k_norm, spec.norm_eps).view(-1),
                             v]).view(qkv.shape)
        attn = f.decode_attention(qkv, cos, sin, k_cache, v_cache, start, spec.n_heads, spec.n_kv_heads,
                                  spec.head_dim, self.scale)
        y = self.o(attn.view(1, 1, self.n_q))
        x, h = f.add_rmsnorm(x, y if y.dtype == x.dtype else y.to(x.dtype), self.mlp_norm, spec.norm_eps)
        return x + self._mlp(h).to(x.dtype)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        B, T, H = h.shape
        x = h.reshape(B * T, H)
        bank = self.experts
        if bank is None:
            raise RuntimeError("a MoE layer runs with its experts unit attached (model.moe.attach_experts)")
        out = bank.routed(x, self.router, self.k, self.renormalise)   # one decode token: one compiled call
        if out is None:
            weight, index = route(F.linear(x.float(), self.router), self.k, self.renormalise)
            dev = torch.device(bank.device)
            if x.device != dev or x.dtype != bank.dtype:  # the experts sit elsewhere: hidden states go there and back
                out = bank(x.to(device=dev, dtype=bank.dtype), index.to(dev), weight.to(dev)).to(device=x.device,
                                                                                                 dtype=x.dtype)
            else:
                out = bank(x, index, weight)
        if self.shared is not None:
            gate, up = self.shared(x).chunk(2, dim=-1)
            y = self.shared_down(F.silu(gate) * up)
            out = out + (torch.sigmoid(F.linear(x.float(), self.shared_gate)) * y.float()).to(out.dtype)
        return out.view(B, T, H)


def build_layer(spec: ModelSpec, weights: Callable[[str], torch.Tensor], i: int, unit: UnitConfig) -> MoELayer:
    return MoELayer(spec, weights, i, unit)


def build_experts(spec: ModelSpec, weights: Callable[[str], torch.Tensor], i: int, unit: UnitConfig) -> ExpertBank:
    """Unit `layers.i.experts`: layer i's stacked experts (floats, or a GGUF file's blocks, run as
    stored at `native`) at the unit's own device and precision."""
    p = f"model.layers.{i}.mlp.experts."
    return ExpertBank(*(weights(p + f"{n}_proj.weight") for n in ("gate", "up", "down")),
                      spec.n_experts, unit.precision, unit.device)


def attach_experts(layer: torch.nn.Module, bank: torch.nn.Module) -> None:
    """Give a MoE layer (built, or a streamed unit's template) its experts unit."""
    getattr(layer, "template", layer).experts = bank


ARCH = Architecture(name="moe", spec_names=("mixtral", "qwen2_moe", "qwen3_moe"), build_layer=build_layer)
