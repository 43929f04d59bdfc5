"""PEFT's LoRA adapter format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's for a transformers Llama-family causal LM,
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]
so `peft.PeftModel.from_pretrained(LlamaForCausalLM(...), DIR)` loads it. The safetensors header
also records the base model's name and fingerprint (PEFT ignores it); loading checks the shapes
and that fingerprint, so an adapter for another model is refused before anything runs.
A directory is written beside its final name and renamed into place: never half-written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from hetero.errors import HeteroError
from hetero.finetune.lora import PARTS, LoraConfig, in_size, module_path, part_sizes

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def peft_key(i: int, target: str, ab: str) -> str:
    return f"base_model.model.model.layers.{i}.{module_path(target)}.lora_{ab}.weight"


def peft_config(cfg: LoraConfig, base: str) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "target_modules": list(cfg.targets),
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def save_adapter(out: str | Path, spec, cfg: LoraConfig, parts: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 extra: dict | None = None) -> Path:
    """Write the adapter dir `out` (replacing an adapter there) atomically."""
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    if out.exists() and not (out / CONFIG).is_file() and any(out.iterdir()):
        raise HeteroError(f"{out} exists and is not an adapter directory: choose another -o")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    for key, (a, b) in parts.items():
        i, t = key.split(".")[1], key.split(".")[2]
        tensors[peft_key(int(i), t, "A")] = a.detach().float().contiguous().cpu()
        tensors[peft_key(int(i), t, "B")] = b.detach().float().contiguous().cpu()
    meta = {"format": "pt", "hetero.base": spec.name, "hetero.fingerprint": spec.fingerprint()}
    save_file(tensors, str(tmp / WEIGHTS), metadata=meta)
    (tmp / CONFIG).write_text(json.dumps(peft_config(cfg, spec.name), indent=2) + "\n")
    if extra:
        (tmp / "hetero_training.json").write_text(json.dumps(extra, indent=2) + "\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def load_adapter(path: str | Path, spec) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config, parts keyed layers.i.<target>) of the adapter at `path`, checked against `spec`."""
    from safetensors import safe_open

    d = Path(path).expanduser()
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise HeteroError(f"{d}: not a LoRA adapter directory (needs {CONFIG} and {WEIGHTS})")
    try:
        conf = json.loads((d / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HeteroError(f"{d / CONFIG}: not readable JSON ({e})") from None
    if conf.get("peft_type") != "LORA":
        raise HeteroError(f"{d}: a {conf.get('peft_type')} adapter; hetero applies LORA adapters")
    if conf.get("use_dora") or conf.get("use_rslora") or conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise HeteroError(f"{d}: DoRA, rsLoRA and per-module ranks are not supported")
    targets = conf.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    try:
        cfg = LoraConfig(rank=int(conf["r"]), alpha=float(conf["lora_alpha"]), targets=tuple(targets))
        with safe_open(str(d / WEIGHTS), framework="pt") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, ValueError, OSError) as e:
        raise HeteroError(f"{d}: not a readable LoRA adapter ({type(e).__name__}: {e})") from None
    fp = meta.get("hetero.fingerprint")
    if fp is not None and fp != spec.fingerprint():
        raise HeteroError(f"{d}: the adapter was trained for {meta.get('hetero.base', 'another model')}, "
                          f"not {spec.name} (the models' shapes differ)")
    parts: dict[str, list] = {}
    for k, t in raw.items():
        m = _KEY.match(k)
        if m is None or m.group(3) not in PARTS:
            raise HeteroError(f"{d}: unexpected tensor {k} (only LoRA A/B of {', '.join(PARTS)} are applied)")
        i, target, ab = int(m.group(1)), m.group(3), m.group(4)
        if i >= spec.n_layers:
            raise HeteroError(f"{d}: the adapter has layer {i}; {spec.name} has {spec.n_layers} layers")
        fused, j = PARTS[target]
        want = (cfg.rank, in_size(spec, fused)) if ab == "A" else (part_sizes(spec, fused)[j], cfg.rank)
        if tuple(t.shape) != want:
            raise HeteroError(f"{d}: {k} is {list(t.shape)}, {spec.name} takes {list(want)}: "
                              "the adapter is for another model")
        parts.setdefault(f"layers.{i}.{target}", [None, None])[0 if ab == "A" else 1] = t.float()
    if not parts or any(a is None or b is None for a, b in parts.values()):
        raise HeteroError(f"{d}: the adapter's A and B tensors do not pair up")
    return cfg, {k: (a, b) for k, (a, b) in parts.items()}


def merge(tensors: dict[str, torch.Tensor], cfg: LoraConfig, parts) -> dict[str, torch.Tensor]:
    """Canonical tensors with W += scale · B A folded in (fp32 arithmetic, the base's dtype kept)."""
    out = dict(tensors)
    for key, (a, b) in parts.items():
        i, t = key.split(".")[1], key.split(".")[2]
        name = f"model.layers.{i}.{module_path(t)}.weight"
        w = out[name]
        out[name] = (w.float() + cfg.scale * (b.float() @ a.float())).to(w.dtype)
    return out


def apply_adapter(net, spec, path: str | Path) -> LoraConfig:
    """Run `net` (a built Decoder) with the adapter at `path` as a side path on every targeted linear
    (the base weights untouched, whatever their precision or residency)."""
    from hetero.finetune.lora import attach

    cfg, parts = load_adapter(path, spec)
    attach(net, spec, cfg, parts, trainable=False)
    return cfg
