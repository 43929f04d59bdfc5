"""ModelSpec: an architecture-neutral description of a decoder model, built without reading weights.

Everything the planner needs — shapes, stored bytes, FLOPs per token, KV-cache bytes — comes from
here. Tensor names are canonical (Hugging Face Llama names) whatever the source format, so the
planner, the loader and the engine speak one language.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from hetero.dtypes import is_block_type, kv_head_bytes, native_format, weight_bytes

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe")
# Families whose MLP is a router over routed experts (model/moe.py); the rest are dense.
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")

SLIDING, FULL = "sliding_attention", "full_attention"   # layer_types values (HF names)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
EXPERTS = "experts"  # a MoE layer's routed experts: the unit `layers.i.experts` beside `layers.i`
# A routed expert's tensor ([E, ...]: every expert of the layer stacked); the router, the shared
# expert and attention are the layer's dense part.
_EXPERT_RE = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.")


@dataclass(frozen=True)
class TensorInfo:
    name: str                 # canonical name, e.g. model.layers.0.self_attn.q_proj.weight
    shape: tuple[int, ...]    # torch order: [out, in] for linear weights
    dtype: str                # storage type as found: F32, BF16, Q4_1, Q8_0, ...
    nbytes: int               # bytes as stored in the source


@dataclass(frozen=True)
class RopeScaling:
    type: str                                   # "llama3" | "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str          # llama | mistral | qwen2 | gemma3 | mixtral | qwen2_moe | qwen3_moe
    source: str                # where it came from (path, built-in name or synthetic:NAME)
    format: str                # gguf | safetensors | synthetic
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    attention_bias: bool
    rope_scaling: RopeScaling | None = None
    tensors: tuple[TensorInfo, ...] = field(default=(), repr=False)
    # Interleaved local/global attention (Gemma 3): a local layer sees only the last `sliding_window`
    # positions (itself included) and rotates with its own RoPE base; () means every layer is global.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None   # attention scale is its -1/2 power (None: head_dim)
    # Mixture of experts (MOE_ARCHITECTURES): each token runs `experts_per_token` of `n_experts`
    # routed experts of intermediate size `intermediate_size`, plus a shared expert of
    # `shared_expert_ffn` (0: none) scaled by a sigmoid gate. 0 experts: a dense MLP.
    n_experts: int = 0
    experts_per_token: int = 0
    shared_expert_ffn: int = 0
    norm_topk_prob: bool = True    # the top-k routing weights renormalised to sum 1 (Mixtral: always)

    # ---- units: the granularity at which the planner places work --------------------------------
    def unit_names(self) -> list[str]:
        """`embed`, `layers.0` … `layers.{n-1}`, `head` (final norm + output projection); a MoE
        model's layer i is two units, `layers.i` (attention, router, shared expert) then
        `layers.i.experts` (its routed experts), each placed on its own."""
        layers = ([f"layers.{i}", f"layers.{i}.{EXPERTS}"] if self.is_moe else [f"layers.{i}"]
                  for i in range(self.n_layers))
        return ["embed", *(u for pair in layers for u in pair), "head"]

    @staticmethod
    def is_experts_unit(unit: str) -> bool:
        return unit.endswith("." + EXPERTS)

    @staticmethod
    def layer_index(unit: str) -> int:
        """i of `layers.i` or `layers.i.experts`."""
        return int(unit.split(".")[1])

    def unit_of(self, tensor_name: str) -> str:
        m = _LAYER_RE.match(tensor_name)
        if m:
            if self.is_moe and self.is_expert_tensor(tensor_name):
                return f"layers.{m.group(1)}.{EXPERTS}"
            return f"layers.{m.group(1)}"
        if tensor_name.startswith("model.embed_tokens"):
            return "embed"
        return "head"  # model.norm.weight, lm_head.weight

    def unit_tensors(self, unit: str) -> list[TensorInfo]:
        ts = [t for t in self.tensors if self.unit_of(t.name) == unit]
        if unit == "head" and self.tie_embeddings:
            # A tied head reads the embedding matrix: count it for the head's traffic too.
            ts += [t for t in self.tensors if t.name == "model.embed_tokens.weight"]
        return ts

    def unit_params(self, unit: str) -> int:
        return sum(math.prod(t.shape) for t in self.unit_tensors(unit))

    def unit_bytes(self, unit: str, precision: str) -> int:
        """Bytes of a unit's weights held at `precision` (1-D tensors stay fp32)."""
        return sum(weight_bytes(precision, t.shape, stored=t.dtype) for t in self.unit_tensors(unit))

    def native_format(self, unit: str) -> str:
        """The format holding most of a unit's matrix bytes when it runs `native` (a block precision,
        or bf16): the cost model prices a native unit at that format's measured rates."""
        by: dict[str, int] = {}
        for t in self.unit_tensors(unit):
            if len(t.shape) >= 2:
                f = native_format(t.dtype)
                by[f] = by.get(f, 0) + weight_bytes(f, t.shape)
        return max(by, key=by.get) if by else "bf16"

    def stored_as(self, unit: str, precision: str) -> bool:
        """True when every matrix of `unit` is stored in the block format `precision` (q4_k, ...)."""
        mats = [t for t in self.unit_tensors(unit) if len(t.shape) >= 2]
        return bool(mats) and all(t.dtype == precision.upper() for t in mats)

    def runnable_precisions(self) -> tuple[str, ...]:
        """Precisions this model's units can be held at: hetero's grids, the block formats hetero
        quantises to, `native` for a file with block formats, and a format it cannot quantise to
        where some unit is wholly stored in it."""
        from hetero.dtypes import BLOCK_PRECISIONS, NATIVE, PRECISIONS, QUANTISABLE_BLOCKS

        from hetero.dtypes import GGML_BLOCKS

        blocks = self.has_block_tensors
        units = self.unit_names()
        # quantising to a block format needs every matrix's rows to be whole blocks (a real file's are)
        widths = {t.shape[-1] for t in self.tensors if len(t.shape) >= 2}
        fits = {p for p in QUANTISABLE_BLOCKS if all(w % GGML_BLOCKS[p.upper()][0] == 0 for w in widths)}
        return tuple(p for p in PRECISIONS
                     if (p not in BLOCK_PRECISIONS and p != NATIVE) or p in fits
                     or (p == NATIVE and blocks)
                     or (p in BLOCK_PRECISIONS and blocks and any(self.stored_as(u, p) for u in units)))

    @property
    def has_block_tensors(self) -> bool:
        """True when some matrix is stored block-quantised (a GGUF file): `native` then means something."""
        return any(is_block_type(t.dtype) for t in self.tensors if len(t.shape) >= 2)

    # ---- experts: a MoE layer's routed experts apart from its dense part --------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def expert_ffn(self) -> int:
        """Each routed expert's intermediate size (0 for a dense model)."""
        return self.intermediate_size if self.is_moe else 0

    @staticmethod
    def is_expert_tensor(name: str) -> bool:
        return bool(_EXPERT_RE.match(name))

    def unit_expert_bytes(self, unit: str, precision: str) -> int:
        """Bytes of a unit's routed experts at `precision` (all of them; 0 for a dense unit): the part
        a planner may place apart from the unit's dense part (unit_bytes - this)."""
        return sum(weight_bytes(precision, t.shape, stored=t.dtype) for t in self.unit_tensors(unit)
                   if self.is_expert_tensor(t.name))

    def unit_expert_fraction(self, unit: str) -> float:
        """The routed experts' share of a unit's parameters: 1 for `layers.i.experts`, else 0."""
        return 1.0 if self.is_moe and self.is_experts_unit(unit) else 0.0

    def expert_bytes(self, unit: str, precision: str) -> float:
        """Bytes of one routed expert (its gate, up and down rows) of an experts unit at `precision`."""
        return self.unit_expert_bytes(unit, precision) / max(1, self.n_experts)

    def experts_touched(self, tokens: int) -> float:
        """Expected distinct experts one layer reads for `tokens` tokens routed uniformly at random
        (k of E each): k for one token, ~E for a long prompt."""
        if not self.is_moe:
            return 0.0
        e, k = self.n_experts, self.experts_per_token
        return e * (1.0 - (1.0 - k / e) ** max(1, tokens))

    def unit_stored_bytes(self, unit: str) -> int:
        return sum(t.nbytes for t in self.unit_tensors(unit))

    # ---- totals ---------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def total_bytes(self, precision: str) -> int:
        return sum(weight_bytes(precision, t.shape, stored=t.dtype) for t in self.tensors)

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def kv_bytes_per_token(self, precision: str = "bf16", layers: int | None = None, kv_dtype: str = "auto") -> int:
        """K and V for one token across `layers` (default: all) decoder layers, where every token is
        kept (a local layer keeps at most its window: see layer_kv_tokens / kv_bytes)."""
        n = self.n_layers if layers is None else layers
        return 2 * n * self.n_kv_heads * kv_head_bytes(self.head_dim, precision, kv_dtype)

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.sliding_window is not None and self.layer_types[layer] == SLIDING

    def layer_kv_tokens(self, layer: int, context: int) -> int:
        """Positions layer `layer` holds in its KV cache at `context` tokens: a local layer's window
        bounds it (its cache is a ring of that many slots)."""
        return min(context, self.sliding_window) if self.is_sliding(layer) else context

    def kv_bytes(self, context: int, precision: str = "bf16", batch: int = 1, kv_dtype: str = "auto") -> int:
        """The whole KV cache of `batch` sequences at `context` tokens."""
        per = self.kv_bytes_per_token(precision, 1, kv_dtype)
        return batch * per * sum(self.layer_kv_tokens(i, context) for i in range(self.n_layers))

    # ---- FLOPs ----------------------------------------------------------------------------------
    def layer_matmul_params(self) -> int:
        """Matrix weights one token multiplies by in a decoder layer (a MoE layer: the router, the
        shared expert and its top-k routed experts only)."""
        return self.dense_matmul_params() + self.routed_matmul_params()

    def dense_matmul_params(self) -> int:
        """Those of unit `layers.i`: attention and the MLP (a MoE layer: the router, the shared expert)."""
        h, kv, f = self.hidden_size, self.kv_dim, self.intermediate_size
        q = self.n_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if not self.is_moe:
            return attn + 3 * h * f
        shared = 3 * h * self.shared_expert_ffn + h if self.shared_expert_ffn else 0
        return attn + h * self.n_experts + shared

    def routed_matmul_params(self) -> int:
        """Those of unit `layers.i.experts`: the top-k routed experts one token runs (0: dense)."""
        return self.experts_per_token * 3 * self.hidden_size * self.intermediate_size if self.is_moe else 0

    def unit_flops_per_token(self, unit: str, context: int) -> float:
        """FLOPs to process one token at `context` tokens of attention history (multiply-add = 2)."""
        if unit == "embed":
            return 0.0
        if unit == "head":
            return 2.0 * self.hidden_size * self.vocab_size
        if self.is_experts_unit(unit):
            return 2.0 * self.routed_matmul_params()
        seen = self.layer_kv_tokens(self.layer_index(unit), context)  # a local layer: its window
        attn = 2.0 * 2.0 * self.n_heads * self.head_dim * seen  # QK^T and AV
        matmul = self.dense_matmul_params() if self.is_moe else self.layer_matmul_params()
        return 2.0 * matmul + attn

    def flops_per_token(self, context: int) -> float:
        return sum(self.unit_flops_per_token(u, context) for u in self.unit_names())

    def prefill_flops(self, prompt_tokens: int) -> float:
        """FLOPs of a causal prefill: the average token attends to about half the prompt."""
        return prompt_tokens * self.flops_per_token(context=max(1, prompt_tokens // 2))

    # ---- identity and serialisation -------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short stable id of the architecture and tensor layout (plans are keyed by it)."""
        import hashlib

        payload = json.dumps(
            [self.architecture, self.n_layers, self.hidden_size, self.intermediate_size,
             self.n_heads, self.n_kv_heads, self.head_dim, self.vocab_size,
             [(t.name, list(t.shape), t.dtype) for t in self.tensors]]
            # only where set, so the ids of families without local layers stay what they were
            + ([self.sliding_window, list(self.layer_types), self.rope_local_theta, self.query_pre_attn_scalar]
               if self.layer_types or self.query_pre_attn_scalar is not None else [])
            + ([self.n_experts, self.experts_per_token, self.shared_expert_ffn, self.norm_topk_prob]
               if self.is_moe else []),
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tensors"] = [dataclasses.asdict(t) for t in self.tensors]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        d["tensors"] = tuple(
            TensorInfo(t["name"], tuple(t["shape"]), t["dtype"], t["nbytes"]) for t in d.get("tensors", ())
        )
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["layer_types"] = tuple(d.get("layer_types") or ())
        return cls(**d)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "architecture": self.architecture, "format": self.format,
            "layers": self.n_layers, "hidden": self.hidden_size, "ffn": self.intermediate_size,
            "heads": self.n_heads, "kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "vocab": self.vocab_size, "context": self.max_context, "rope_theta": self.rope_theta,
            "rope_scaling": dataclasses.asdict(self.rope_scaling) if self.rope_scaling else None,
            "norm_eps": self.norm_eps, "tied_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias, "params": self.n_params,
            "stored_bytes": self.stored_bytes,
            **({"sliding_window": self.sliding_window, "rope_local_theta": self.rope_local_theta,
                "local_layers": sum(self.is_sliding(i) for i in range(self.n_layers))}
               if self.layer_types else {}),
            **({"experts": self.n_experts, "experts_per_token": self.experts_per_token,
                "expert_ffn": self.expert_ffn, "shared_expert_ffn": self.shared_expert_ffn,
                "norm_topk_prob": self.norm_topk_prob} if self.is_moe else {}),
        }


def expected_tensors(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Canonical names and shapes a checkpoint of this shape and family holds (Gemma 3 adds q/k norms
    and norms after attention and around the MLP; a MoE layer holds a router and its experts stacked
    [E, ...] instead of the MLP, and Qwen3-MoE q/k norms)."""
    h, f, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    q, kv = spec.n_heads * spec.head_dim, spec.kv_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
        out += _moe_tensors(spec, p) if spec.is_moe else [
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
        if spec.architecture == "qwen3_moe":
            out += [(p + "self_attn.q_norm.weight", (spec.head_dim,)), (p + "self_attn.k_norm.weight", (spec.head_dim,))]
        if spec.architecture == "gemma3":
            out += [(p + "self_attn.q_norm.weight", (spec.head_dim,)), (p + "self_attn.k_norm.weight", (spec.head_dim,)),
                    (p + "pre_feedforward_layernorm.weight", (h,)), (p + "post_feedforward_layernorm.weight", (h,))]
        if spec.attention_bias:
            out += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]
    out.append(("model.norm.weight", (h,)))
    if not spec.tie_embeddings:
        out.append(("lm_head.weight", (v, h)))
    return out


def _moe_tensors(spec: ModelSpec, p: str) -> list[tuple[str, tuple[int, ...]]]:
    """A MoE layer's MLP: the router [E, h], the routed experts stacked [E, f, h] / [E, h, f], and the
    shared expert with its gate [1, h] where the family has one."""
    h, f, e, fs = spec.hidden_size, spec.intermediate_size, spec.n_experts, spec.shared_expert_ffn
    out = [(p + "mlp.gate.weight", (e, h)),
           (p + "mlp.experts.gate_proj.weight", (e, f, h)),
           (p + "mlp.experts.up_proj.weight", (e, f, h)),
           (p + "mlp.experts.down_proj.weight", (e, h, f))]
    if fs:
        out += [(p + "mlp.shared_expert.gate_proj.weight", (fs, h)),
                (p + "mlp.shared_expert.up_proj.weight", (fs, h)),
                (p + "mlp.shared_expert.down_proj.weight", (h, fs)),
                (p + "mlp.shared_expert_gate.weight", (1, h))]
    return out
