"""Hugging Face style model dirs: config.json -> ModelSpec, safetensors headers -> tensor table.

Only headers are read (the first 8 bytes give the JSON header length): planning never touches weights.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from hetero.dtypes import storage_bytes
from hetero.errors import HeteroError
from hetero.model.spec import SUPPORTED_ARCHITECTURES, ModelSpec, RopeScaling, TensorInfo, expected_tensors

_ARCH_BY_CLASS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def _architecture(cfg: dict[str, Any]) -> str:
    mt = cfg.get("model_type")
    if mt in SUPPORTED_ARCHITECTURES:
        return mt
    for cls in cfg.get("architectures") or []:
        if cls in _ARCH_BY_CLASS:
            return _ARCH_BY_CLASS[cls]
    named = mt or ", ".join(cfg.get("architectures") or []) or "unknown"
    raise HeteroError(f"unsupported architecture {named!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers ≥ 5 writes `rope_parameters` (theta included); older configs `rope_scaling`.
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


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


def spec_from_config(cfg: dict[str, Any], source: str, fmt: str,
                     tensors: tuple[TensorInfo, ...] | None = None, name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from an HF config dict; without `tensors`, the Llama layout in bf16 is assumed."""
    arch = _architecture(cfg)
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        spec = ModelSpec(
            name=name or cfg.get("_name_or_path") or source,
            architecture=arch, source=source, format=fmt,
            n_layers=int(cfg["num_hidden_layers"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]), n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            max_context=int(cfg.get("max_position_embeddings", 2048)),
            rope_theta=float(cfg.get("rope_theta") or _rope_params(cfg).get("rope_theta") or 10000.0),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            rope_scaling=_rope_scaling(cfg),
        )
    except KeyError as e:
        raise HeteroError(f"config.json lacks {e.args[0]!r}") from None
    if tensors is None:
        dt = {"float32": "F32", "float16": "F16"}.get(str(cfg.get("torch_dtype")), "BF16")
        tensors = tuple(TensorInfo(n, s, dt, storage_bytes(dt, s)) for n, s in expected_tensors(spec))
    import dataclasses

    return dataclasses.replace(spec, tensors=tensors)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor dtypes, shapes and offsets), nothing else."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise HeteroError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise HeteroError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HeteroError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise HeteroError(f"{path}: not a safetensors file (header is not an object)")
    return header


def safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [d / f for f in sorted(set(weight_map.values()))]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise HeteroError(f"{d}: no .safetensors files next to config.json")
    return files


def spec_from_hf_dir(d: Path, source: str | None = None, fmt: str = "safetensors") -> ModelSpec:
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise HeteroError(f"{d}: not a model dir (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise HeteroError(f"{cfg_path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    _architecture(cfg)  # an unsupported model is named before anything else is looked at
    tensors = []
    for f in safetensors_files(d):
        for tname, meta in read_safetensors_header(f).items():
            if tname == "__metadata__":
                continue
            shape = tuple(meta["shape"])
            a, b = meta["data_offsets"]
            tensors.append(TensorInfo(tname, shape, meta["dtype"], b - a))
    name = cfg.get("_name_or_path") or d.name
    return spec_from_config(cfg, source=source or str(d), fmt=fmt, tensors=tuple(tensors), name=name)
