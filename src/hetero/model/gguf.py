"""GGUF reading through the `gguf` package: metadata -> ModelSpec, tensors -> canonical torch tensors.

llama.cpp's converter permutes the rows of Q and K for the `llama` architecture (it uses interleaved
RoPE pairs); we undo that on load so that every source feeds the same half-split RoPE decoder.
Gemma 3 is not permuted; its norm weights are stored as the multiplier (HF's 1 + w), the form hetero's
canonical tensors use (model/gemma3.py adds the 1 to an HF checkpoint's norms instead).
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hetero.errors import HeteroError
from hetero.model.spec import SUPPORTED_ARCHITECTURES, ModelSpec, RopeScaling, TensorInfo
from hetero.model.validate import NORM_EPS_MAX, ROPE_THETA_RANGE, check_float, check_int, check_spec

_GGUF_ARCH = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3": "gemma3",
              "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# llama.cpp writes Mixtral as arch `llama` with {arch}.expert_count set; its expert matrices are
# merged [E, ...] tensors (hetero's canonical form), its router ffn_gate_inp
_MOE_NAMES = {
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# whether llama.cpp renormalises the top-k weights where the file has no {arch}.expert_weights_norm
_MOE_NORM_DEFAULT = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 3 names its norms around attention and the MLP its own way (ffn_norm is the norm before the MLP)
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_LAYER_NAMES_BY_ARCH = {"gemma3": _GEMMA3_LAYER_NAMES,
                        **{a: {**_LAYER_NAMES, **_MOE_NAMES} for a in ("mixtral", "qwen2_moe", "qwen3_moe")}}
# llama.cpp's fixed Gemma 3 layout where the file does not say: every 6th layer global, local RoPE base 1e4
GEMMA3_PATTERN, GEMMA3_LOCAL_THETA = 6, 10000.0
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def canonical_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The canonical (HF) name of a GGUF tensor of architecture `arch` (a spec.architecture value)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    names = _LAYER_NAMES_BY_ARCH.get(arch, _LAYER_NAMES)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
    return None  # e.g. rope_freqs: derived from metadata instead


@lru_cache(maxsize=4)
def open_reader(path: Path):
    """A memory-mapped GGUFReader; a truncated or corrupt file becomes a one-line error.

    The header is walked and checked first (gguf_index): the reader sizes its arrays from counts in
    the file, and a count of 2^62 must be refused before it allocates anything."""
    import gguf

    from hetero.model.gguf_index import tensor_table

    tensor_table(path)
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise HeteroError(f"{path}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:
        return default


def metadata(path: Path) -> dict[str, Any]:
    """Scalar metadata of a GGUF file (token lists are skipped: they are large)."""
    r = open_reader(path)
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return {k: _field(r, k) for k in r.fields if k not in skip and not k.startswith("GGUF.")}


def _check_tokenizer(path: Path, r, vocab: int) -> None:
    """Token strings are UTF-8, fit the embedding, and the special ids name real tokens."""
    f = r.fields.get("tokenizer.ggml.tokens")
    if f is None:
        return
    n = len(f.data)
    if n > vocab:
        raise HeteroError(f"{path}: {n} tokens but the embedding has {vocab} rows")
    try:
        for idx in f.data:
            bytes(f.parts[idx]).decode("utf-8")
    except (UnicodeDecodeError, IndexError, TypeError):
        raise HeteroError(f"{path}: the tokenizer's token strings are not valid UTF-8 (corrupt file)") from None
    for key in ("bos", "eos", "unknown", "padding", "eot"):
        v = _field(r, f"tokenizer.ggml.{key}_token_id")
        if v is not None and (not isinstance(v, int) or not 0 <= v < n):
            raise HeteroError(f"{path}: tokenizer.ggml.{key}_token_id = {v!r} is not a token id (0..{n - 1})")
    tpl = r.fields.get("tokenizer.chat_template")
    if tpl is not None and not isinstance(_field(r, "tokenizer.chat_template"), str):
        raise HeteroError(f"{path}: tokenizer.chat_template is not a UTF-8 string")


def spec_from_gguf(path: Path, name: str | None = None) -> ModelSpec:
    r = open_reader(path)
    arch = _field(r, "general.architecture")
    if not isinstance(arch, str) or arch not in _GGUF_ARCH:
        raise HeteroError(
            f"unsupported architecture {arch!r} in {path.name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    a = arch
    where = str(path)

    def key(k: str, default: Any = None) -> Any:
        return _field(r, f"{a}.{k}", default)

    def count(k: str, field: str, default: Any = None) -> int:
        v = key(k, default)
        if v is None:
            raise HeteroError(f"{path}: GGUF metadata lacks {a}.{k}")
        return check_int(v, field, f"{where}: {a}.{k}")

    hidden = count("embedding_length", "hidden_size")
    heads = count("attention.head_count", "n_heads")
    n_layers = count("block_count", "n_layers")
    moe = _moe_fields(path, arch, key, count) if key("expert_count") or arch in ("qwen2moe", "qwen3moe") else {}
    sarch = "mixtral" if moe and arch == "llama" else _GGUF_ARCH[arch]
    if moe and arch not in ("llama", "qwen2moe", "qwen3moe"):
        raise HeteroError(f"{path}: experts in a {arch} model are not supported (Mixtral-style llama, qwen2moe, qwen3moe)")
    ffn = moe.pop("intermediate_size", None) or count("feed_forward_length", "intermediate_size")
    kv_heads = count("attention.head_count_kv", "n_kv_heads", heads)
    head_dim = count("attention.key_length", "head_dim", hidden // heads)
    tensors = []
    for t in r.tensors:
        cname = canonical_name(t.name, sarch)
        if cname is None:
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        if cname.endswith("shared_expert_gate.weight") and len(shape) == 1:
            shape = (1, *shape)   # llama.cpp's shared-expert gate is a vector; canonical [1, h]
        tensors.append(TensorInfo(cname, shape, t.tensor_type.name, int(t.n_bytes)))
    names = {t.name for t in tensors}
    vocab = key("vocab_size")
    if vocab is None:
        emb = next((t for t in tensors if t.name == "model.embed_tokens.weight"), None)
        if emb is None:
            raise HeteroError(f"{path}: no token embedding (token_embd.weight) and no {a}.vocab_size")
        vocab = emb.shape[0]
    vocab = check_int(vocab, "vocab_size", f"{where}: vocab size")
    _check_tokenizer(path, r, vocab)
    scaling = None
    if key("rope.scaling.type") == "linear":
        scaling = RopeScaling(type="linear", factor=check_float(key("rope.scaling.factor", 1.0), "rope.scaling.factor", where))
    elif "rope_freqs.weight" in {t.name for t in r.tensors}:
        # Llama 3.1-style GGUFs carry precomputed llama3 frequency factors; original params are
        # not in metadata, so we use the published defaults when the factors tensor is present.
        scaling = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)
    local = _local_layers(path, arch, n_layers, key) if arch == "gemma3" else {}
    general_name = _field(r, "general.name")
    spec = ModelSpec(
        name=name or (general_name if isinstance(general_name, str) else None) or path.stem,
        architecture=sarch, source=str(path), format="gguf",
        n_layers=n_layers, hidden_size=hidden, intermediate_size=ffn, n_heads=heads,
        n_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        max_context=count("context_length", "max_context", 2048),
        rope_theta=check_float(key("rope.freq_base", 10000.0), "rope.freq_base", where, *ROPE_THETA_RANGE),
        norm_eps=check_float(key("attention.layer_norm_rms_epsilon", 1e-5), "layer_norm_rms_epsilon", where,
                             0.0, NORM_EPS_MAX),
        tie_embeddings="lm_head.weight" not in names,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in names,
        rope_scaling=scaling, tensors=tuple(tensors), **local, **moe,
    )
    check_spec(spec, where)
    return spec


def _moe_fields(path: Path, arch: str, key, count) -> dict[str, Any]:
    """A MoE file's experts: count, used per token, each expert's FFN (expert_feed_forward_length,
    else feed_forward_length: Mixtral's), the shared expert's, and whether the top-k is renormalised."""
    e = count("expert_count", "n_experts")
    k = count("expert_used_count", "experts_per_token")
    if k > e:
        raise HeteroError(f"{path}: {arch}.expert_used_count {k} exceeds expert_count {e}")
    out: dict[str, Any] = {"n_experts": e, "experts_per_token": k}
    if key("expert_feed_forward_length") is not None:
        out["intermediate_size"] = count("expert_feed_forward_length", "intermediate_size")
    if arch == "qwen2moe":
        out["shared_expert_ffn"] = count("expert_shared_feed_forward_length", "intermediate_size")
    norm = key("expert_weights_norm", _MOE_NORM_DEFAULT["mixtral" if arch == "llama" else _GGUF_ARCH[arch]])
    if not isinstance(norm, bool):
        raise HeteroError(f"{path}: {arch}.expert_weights_norm must be a boolean (got {norm!r})")
    out["norm_topk_prob"] = norm
    return out


def _local_layers(path: Path, arch: str, n_layers: int, key) -> dict[str, Any]:
    """Gemma 3's interleaved local/global layers: the window from the file; which layers are local from
    `{arch}.attention.sliding_window_pattern` where present (a per-layer bool list, or a period),
    else llama.cpp's fixed period of 6; the local RoPE base from rope.freq_base_swa, else 1e4."""
    from hetero.model.spec import FULL, SLIDING

    where = f"{path}: {arch}.attention.sliding_window"
    window = check_int(key("attention.sliding_window", 4096), "max_context", where)
    pattern = key("attention.sliding_window_pattern", GEMMA3_PATTERN)
    if isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(b, bool) for b in pattern):
            raise HeteroError(f"{path}: {arch}.attention.sliding_window_pattern must hold {n_layers} booleans")
        types = tuple(SLIDING if b else FULL for b in pattern)
    else:
        period = check_int(pattern, "n_layers", f"{path}: {arch}.attention.sliding_window_pattern")
        types = tuple(SLIDING if (i + 1) % period else FULL for i in range(n_layers))
    local_theta = check_float(key("rope.freq_base_swa", GEMMA3_LOCAL_THETA), "rope.freq_base_swa", str(path),
                              *ROPE_THETA_RANGE)
    head_dim = key("attention.key_length")
    return {"sliding_window": window, "layer_types": types, "rope_local_theta": local_theta,
            "query_pre_attn_scalar": float(head_dim) if isinstance(head_dim, int) else None}


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (interleaved RoPE pairs -> half split)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(t) -> np.ndarray:
    """A GGUF tensor as float32 in torch's dim order."""
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    qt = t.tensor_type
    if qt == GGMLQuantizationType.F32:
        arr = np.asarray(t.data, dtype=np.float32)
    elif qt == GGMLQuantizationType.F16:
        arr = np.asarray(t.data, dtype=np.float16).astype(np.float32)
    else:
        arr = quants.dequantize(np.asarray(t.data), qt).astype(np.float32, copy=False)
    return arr.reshape(shape)


def iter_tensors(path: Path, spec: ModelSpec, names: set[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (canonical name, float32 array) for each tensor (or those in `names`), Q/K unpermuted."""
    r = open_reader(path)
    for t in r.tensors:
        cname = canonical_name(t.name, spec.architecture)
        if cname is None or (names is not None and cname not in names):
            continue
        try:
            arr = dequantize(t)
        except (ValueError, IndexError, NotImplementedError) as e:
            raise HeteroError(f"{path}: cannot read tensor {t.name} ({e})") from None
        yield cname, unpermute(cname, arr, spec)


def unpermute(cname: str, arr: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """llama.cpp stores Llama/Mistral Q and K rows permuted for its RoPE layout: undo it."""
    if spec.architecture not in ("llama", "mistral", "mixtral"):
        return arr
    if cname.endswith(("q_proj.weight", "q_proj.bias")):
        return _unpermute(arr, spec.n_heads)
    if cname.endswith(("k_proj.weight", "k_proj.bias")):
        return _unpermute(arr, spec.n_kv_heads)
    return arr
