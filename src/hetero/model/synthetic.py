"""Synthetic Llama-family models: named configs with seeded random weights.

Speed does not depend on trained weights, so big models are synthetic. The spec comes from the
config alone (planning a 70B costs nothing); the weights are written once, as an HF-style
safetensors dir under the cache, only when a run needs them.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hetero.errors import HeteroError
from hetero.paths import cache_dir

# HF config.json dicts. Shapes follow the public model cards they are named after.
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # TinyLlama-1.1B shape.
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                     rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Llama-2-7B shape.
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                     rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Llama-2-13B shape.
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Llama-3-70B shape (80 layers, GQA 8, llama3 RoPE scaling as in 3.1).
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192)),
}


def config(name: str) -> dict[str, Any]:
    if name not in CONFIGS:
        raise HeteroError(f"unknown synthetic model {name!r}; known: {', '.join(sorted(CONFIGS))}")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
           "hidden_act": "silu", "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
           **CONFIGS[name]}
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg


def weights_dir(name: str) -> Path:
    return cache_dir() / "synthetic" / name


def ensure_weights(name: str, seed: int = 0, progress: bool = True) -> Path:
    """Write the seeded random weights of `name` once (bf16 safetensors); return the directory."""
    import torch
    from safetensors.torch import save_file

    from hetero.model.spec import expected_tensors
    from hetero.model.hf import spec_from_config

    out = weights_dir(name)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    cfg = config(name)
    spec = spec_from_config(cfg, source=f"synthetic:{name}", fmt="synthetic")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        gen = torch.Generator().manual_seed(seed)
        shard, shard_bytes, shards, index = {}, 0, [], {}
        names = expected_tensors(spec)
        from hetero.progress import progress_bar

        with progress_bar(f"writing synthetic:{name}", total=len(names), enabled=progress) as advance:
            for tname, shape in names:
                if len(shape) == 1:
                    t = torch.ones(shape) if "norm" in tname else torch.zeros(shape)
                else:
                    # Scaled so activations stay O(1) through the layers, like a trained model's.
                    t = torch.randn(shape, generator=gen) * (shape[-1] ** -0.5)
                shard[tname] = t.to(torch.bfloat16)
                shard_bytes += shard[tname].numel() * 2
                if shard_bytes >= 2 << 30:
                    shards.append(shard)
                    shard, shard_bytes = {}, 0
                advance()
            if shard:
                shards.append(shard)
        for i, s in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
            save_file(s, str(tmp / fname), metadata={"format": "pt"})
            index.update({k: fname for k in s})
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
