"""Hugging Face style model dirs: config.json -> ModelSpec, safetensors headers -> tensor table.

Only headers are read (the first 8 bytes give the JSON header length): planning never touches weights.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from hetero.dtypes import storage_bytes
from hetero.errors import HeteroError
from hetero.model.spec import (MOE_ARCHITECTURES, SUPPORTED_ARCHITECTURES, ModelSpec, RopeScaling, TensorInfo,
                               expected_tensors)
from hetero.model.validate import NORM_EPS_MAX, ROPE_THETA_RANGE, check_float, check_int, check_shape, check_tensors

_ARCH_BY_CLASS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                  "Gemma3ForCausalLM": "gemma3", "MixtralForCausalLM": "mixtral",
                  "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe"}
_MODEL_TYPES = {"gemma3_text": "gemma3"}


def _architecture(cfg: dict[str, Any]) -> str:
    mt = cfg.get("model_type")
    if mt == "gemma3" and isinstance(cfg.get("text_config"), dict):
        raise HeteroError("a multimodal Gemma 3 checkpoint (text_config + vision tower): only the text-only "
                          "Gemma3ForCausalLM layout is supported")
    if mt in SUPPORTED_ARCHITECTURES:
        return mt
    if mt in _MODEL_TYPES:
        return _MODEL_TYPES[mt]
    classes = cfg.get("architectures")
    classes = [c for c in classes if isinstance(c, str)] if isinstance(classes, list) else []
    for cls in classes:
        if cls in _ARCH_BY_CLASS:
            return _ARCH_BY_CLASS[cls]
    named = (mt if isinstance(mt, str) else None) or ", ".join(classes) or "unknown"
    raise HeteroError(f"unsupported architecture {named!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _rope_params(cfg: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    # transformers ≥ 5 writes `rope_parameters` (theta included); older configs `rope_scaling`.
    # Families with local layers nest one dict per layer type (Gemma 3: full_attention, sliding_attention).
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get(layer_type), dict):
        return rp[layer_type]
    if isinstance(rp, dict) and any(isinstance(v, dict) for v in rp.values()):
        return {}
    return rp or cfg.get("rope_scaling") or {}


def _rope_scaling(cfg: dict[str, Any]) -> RopeScaling | None:
    rs = _rope_params(cfg)
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    if kind not in ("llama3", "linear"):
        raise HeteroError(f"unsupported RoPE scaling {kind!r}; supported: llama3, linear")
    return RopeScaling(
        type=kind, factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )


def _opt(cfg: dict[str, Any], key: str, default: Any) -> Any:
    v = cfg.get(key)
    return default if v is None else v


def spec_from_config(cfg: dict[str, Any], source: str, fmt: str,
                     tensors: tuple[TensorInfo, ...] | None = None, name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from an HF config dict; without `tensors`, the Llama layout in bf16 is assumed.

    The dict is validated as a schema first (types, ranges, required fields): one error names the field."""
    if not isinstance(cfg, dict):
        raise HeteroError(f"{source}: config.json must be a JSON object (got {type(cfg).__name__})")
    arch = _architecture(cfg)
    where = f"{source}: config.json"
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if cfg.get(key) is None:
            raise HeteroError(f"{where} lacks {key!r}")
    hidden = check_int(cfg["hidden_size"], "hidden_size", f"{where} hidden_size")
    heads = check_int(cfg["num_attention_heads"], "n_heads", f"{where} num_attention_heads")
    rope = _rope_params(cfg)
    if not isinstance(rope, dict):
        raise HeteroError(f"{where}: rope_scaling must be an object (got {type(rope).__name__})")
    for key in ("tie_word_embeddings", "attention_bias"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise HeteroError(f"{where}: {key} must be true or false (got {cfg[key]!r})")
    name = name or cfg.get("_name_or_path") or source
    gemma = _gemma3_fields(cfg, where) if arch == "gemma3" else {}
    moe = _moe_fields(cfg, arch, where) if arch in MOE_ARCHITECTURES else {}
    bias = moe.pop("attention_bias", None)
    ffn = moe.pop("intermediate_size", None)   # a MoE layer's FFN is each routed expert's
    theta = gemma.pop("rope_theta", None)   # the global layers' base: nested in rope_parameters
    try:
        spec = ModelSpec(
            name=name if isinstance(name, str) else source,
            architecture=arch, source=source, format=fmt,
            n_layers=check_int(cfg["num_hidden_layers"], "n_layers", f"{where} num_hidden_layers"),
            hidden_size=hidden,
            intermediate_size=ffn or check_int(cfg["intermediate_size"], "intermediate_size", f"{where} intermediate_size"),
            n_heads=heads,
            n_kv_heads=check_int(_opt(cfg, "num_key_value_heads", heads), "n_kv_heads", f"{where} num_key_value_heads"),
            head_dim=check_int(_opt(cfg, "head_dim", 256 if gemma else hidden // heads), "head_dim",
                               f"{where} head_dim"),
            vocab_size=check_int(cfg["vocab_size"], "vocab_size", f"{where} vocab_size"),
            max_context=check_int(_opt(cfg, "max_position_embeddings", 131072 if gemma else 2048), "max_context",
                                  f"{where} max_position_embeddings"),
            rope_theta=theta or check_float(_opt(cfg, "rope_theta", _opt(rope, "rope_theta", 10000.0)), "rope_theta", where,
                                    *ROPE_THETA_RANGE),
            norm_eps=check_float(_opt(cfg, "rms_norm_eps", 1e-6), "rms_norm_eps", where, 0.0, NORM_EPS_MAX),
            tie_embeddings=bool(_opt(cfg, "tie_word_embeddings", arch == "gemma3")),
            attention_bias=bias if bias is not None else bool(_opt(cfg, "attention_bias", arch == "qwen2")),
            rope_scaling=_rope_scaling(cfg), **gemma, **moe,
        )
    except (TypeError, ValueError) as e:  # e.g. a RoPE factor that is a list
        raise HeteroError(f"{where}: a field has the wrong type ({e})") from None
    check_shape(spec, where)
    if tensors is None:
        dt = {"float32": "F32", "float16": "F16"}.get(str(cfg.get("torch_dtype")), "BF16")
        tensors = tuple(TensorInfo(n, s, dt, storage_bytes(dt, s)) for n, s in expected_tensors(spec))
    import dataclasses

    spec = dataclasses.replace(spec, tensors=tensors)
    check_tensors(spec, source)
    return spec


def _gemma3_fields(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Gemma 3's local/global layout (transformers' defaults where a field is absent); the features
    hetero does not run (logit soft-capping, bidirectional attention, another activation) are refused."""
    from hetero.model.spec import FULL, SLIDING

    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise HeteroError(f"{where}: {key} = {cfg[key]!r} is not supported (Gemma 3 has none)")
    if cfg.get("use_bidirectional_attention"):
        raise HeteroError(f"{where}: use_bidirectional_attention is not supported (a causal decoder only)")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise HeteroError(f"{where}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
    n = check_int(cfg["num_hidden_layers"], "n_layers", f"{where} num_hidden_layers")
    types = cfg.get("layer_types")
    if types is None:
        period = check_int(_opt(cfg, "sliding_window_pattern", 6), "n_layers", f"{where} sliding_window_pattern")
        types = [SLIDING if (i + 1) % period else FULL for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in (SLIDING, FULL) for t in types):
        raise HeteroError(f"{where}: layer_types must list {n} of {SLIDING!r} / {FULL!r}")
    full, local = _rope_params(cfg, FULL), _rope_params(cfg, SLIDING)
    theta = _opt(full, "rope_theta", _opt(cfg, "rope_theta", 1_000_000.0))
    local_theta = _opt(local, "rope_theta", _opt(cfg, "rope_local_base_freq", 10_000.0))
    return {
        "rope_theta": check_float(theta, "rope_theta", where, *ROPE_THETA_RANGE),
        "sliding_window": check_int(_opt(cfg, "sliding_window", 4096), "max_context", f"{where} sliding_window"),
        "layer_types": tuple(types),
        "rope_local_theta": check_float(local_theta, "rope_local_base_freq", where, *ROPE_THETA_RANGE),
        "query_pre_attn_scalar": check_float(_opt(cfg, "query_pre_attn_scalar", 256), "query_pre_attn_scalar",
                                             where, 0.0, 1e6),
    }


def _moe_fields(cfg: dict[str, Any], arch: str, where: str) -> dict[str, Any]:
    """The experts of a Mixtral / Qwen2-MoE / Qwen3-MoE config (transformers' defaults where absent);
    layouts hetero does not run (dense layers between sparse ones, sliding windows) are refused."""
    if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise HeteroError(f"{where}: dense MLP layers between MoE layers (decoder_sparse_step / mlp_only_layers) "
                          "are not supported")
    if cfg.get("use_sliding_window") or (arch == "mixtral" and cfg.get("sliding_window") is not None):
        raise HeteroError(f"{where}: sliding-window attention is not supported for {arch}")
    n = cfg.get("num_local_experts") if arch == "mixtral" else _opt(cfg, "num_experts", cfg.get("num_local_experts"))
    e = check_int(8 if n is None else n, "n_experts", f"{where} num_experts")
    k = check_int(_opt(cfg, "num_experts_per_tok", 2), "experts_per_token", f"{where} num_experts_per_tok")
    if k > e:
        raise HeteroError(f"{where}: num_experts_per_tok {k} exceeds the {e} experts")
    out: dict[str, Any] = {"n_experts": e, "experts_per_token": k}
    for key in ("norm_topk_prob", "qkv_bias"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise HeteroError(f"{where}: {key} must be true or false (got {cfg[key]!r})")
    if arch == "mixtral":  # softmax over the top-k logits: renormalised by construction
        return out
    out["intermediate_size"] = check_int(cfg.get("moe_intermediate_size"), "intermediate_size",
                                         f"{where} moe_intermediate_size")
    out["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))
    if arch == "qwen2_moe":
        out["shared_expert_ffn"] = check_int(cfg.get("shared_expert_intermediate_size"), "intermediate_size",
                                             f"{where} shared_expert_intermediate_size")
        out["attention_bias"] = bool(_opt(cfg, "qkv_bias", True))
    return out


_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                       "BOOL": 1}


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor dtypes, shapes and offsets), nothing else.

    The layout is checked against the file size: each tensor's bytes are what its dtype and shape
    need, inside the data section, and no two tensors overlap, so a corrupt file fails here, not
    deep inside a run."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise HeteroError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20 or 8 + n > size:
                raise HeteroError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise HeteroError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise HeteroError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise HeteroError(f"{path}: not a safetensors file (header is not an object)")
    _check_layout(path, header, size - 8 - n)
    return header


def _check_layout(path: Path, header: dict[str, Any], data_len: int) -> None:
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        bad = f"{path}: corrupt safetensors header (tensor {name!r}"
        if not isinstance(meta, dict):
            raise HeteroError(f"{bad} is not an object)")
        dtype, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise HeteroError(f"{bad} has unknown dtype {dtype!r})")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise HeteroError(f"{bad} has an invalid shape {shape!r})")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise HeteroError(f"{bad} has invalid data_offsets {offs!r})")
        a, b = offs
        if not 0 <= a <= b <= data_len:
            raise HeteroError(f"{bad} lies outside the file: bytes {a}..{b} of {data_len}; truncated?)")
        need = math.prod(shape) * _SAFETENSORS_DTYPES[dtype]
        if b - a != need:
            raise HeteroError(f"{bad} holds {b - a} bytes, {dtype} {shape} needs {need})")
        spans.append((a, b, name))
    # As the safetensors format requires: tensors tile the data section, no gap, no overlap.
    spans.sort()
    end = 0
    for a, b, name in spans:
        if a != end:
            what = "overlaps the tensor before it" if a < end else f"starts at {a}, after a gap from {end}"
            raise HeteroError(f"{path}: corrupt safetensors header (tensor {name!r} {what})")
        end = b
    if end != data_len:
        raise HeteroError(f"{path}: corrupt safetensors file ({data_len - end} bytes after the last tensor)")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise HeteroError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise HeteroError(f"{path}: {what} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise HeteroError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError):
        raise HeteroError(f"{path}: invalid JSON") from None


def safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        idx = _read_json(index, "the index")
        weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HeteroError(f"{index}: needs a weight_map object of tensor name -> file name")
        files = [d / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if f.resolve().parent != d.resolve() or not f.is_file():
                raise HeteroError(f"{index}: weight file {f.name!r} is missing or outside the model dir")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise HeteroError(f"{d}: no .safetensors files next to config.json")
    return files


def read_config(d: Path) -> dict[str, Any]:
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise HeteroError(f"{d}: not a model dir (no config.json)")
    cfg = _read_json(cfg_path, "config.json")
    if not isinstance(cfg, dict):
        raise HeteroError(f"{cfg_path}: must be a JSON object (got {type(cfg).__name__})")
    return cfg


def _fold_packed(tensors: list[TensorInfo]) -> list[TensorInfo]:
    """compressed-tensors pack-quantized parts (hetero.model.ct) as the one weight they stand for,
    typed as what a read returns: F32 (hetero.model.weights dequantises them on read)."""
    from hetero.model import ct

    parts = [t for t in tensors if ct.is_part(t.name)]
    if not parts:
        return tensors
    out = [t for t in tensors if not ct.is_part(t.name)]
    by_prefix: dict[str, list[TensorInfo]] = {}
    for t in parts:
        by_prefix.setdefault(t.name.rsplit(".", 1)[0] + ".", []).append(t)
    for prefix, ps in by_prefix.items():
        packed = next((t for t in ps if t.name.endswith("weight_packed")), None)
        if packed is None:
            raise HeteroError(f"{prefix}: compressed-tensors parts without weight_packed")
        shape = ct.dense_shape(packed.shape)
        out.append(TensorInfo(prefix + "weight", shape, "F32", 4 * shape[0] * shape[1]))
    return out


def spec_from_hf_dir(d: Path, source: str | None = None, fmt: str = "safetensors") -> ModelSpec:
    cfg = read_config(d)
    _architecture(cfg)  # an unsupported model is named before anything else is looked at
    tensors = []
    for f in safetensors_files(d):
        for tname, meta in read_safetensors_header(f).items():
            if tname == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            tensors.append(TensorInfo(tname, tuple(meta["shape"]), meta["dtype"], b - a))
    tensors = _fold_packed(tensors)
    if _architecture(cfg) in MOE_ARCHITECTURES:  # per-expert matrices -> one stacked tensor each
        from hetero.model.moe_names import fold

        tensors = fold(tensors)
    name = cfg.get("_name_or_path") or d.name
    return spec_from_config(cfg, source=source or str(d), fmt=fmt, tensors=tuple(tensors),
                            name=name if isinstance(name, str) else d.name)
