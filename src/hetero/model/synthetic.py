"""Synthetic models (Llama family, and mixtures of experts): named configs with seeded random weights.

Speed does not depend on trained weights, so big models are synthetic. The spec comes from the
config alone (planning a 70B costs nothing); the weights are written once, as an HF-style
safetensors dir under the cache, only when a run needs them. Each tensor is seeded by its own name
(`tensor()`), so any one of them is made without the others: the GGUF export streams them.

Shapes listed in BUILTIN_TOKENIZER use the built-in model's vocabulary (SmolLM2's 49152 tokens), so
real text tokenises as in a trained model and a GGUF written from them runs in llama.cpp; the others
keep their own vocab size and hetero's byte-level fallback tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hetero.errors import HeteroError
from hetero.paths import cache_dir

_QWEN3_MOE = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", tie_word_embeddings=False,
                  decoder_sparse_step=1, mlp_only_layers=[])

# HF config.json dicts. Shapes follow the public model cards they are named after.
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # tiny with every matmul's K a multiple of 32: GGUF block formats hold all of it.
    "tiny32": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                   rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # TinyLlama-1.1B shape.
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                     rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # TinyLlama-1.1B shape with the built-in (SmolLM2) vocabulary: the same-file benchmark's model.
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048,
                           rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Llama-2-7B shape with the built-in vocabulary.
    "llama2-7b-smol": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=49152, max_position_embeddings=4096,
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
    # ---- mixtures of experts (model/moe.py) ----
    # A tiny Qwen3-MoE for tests: 8 experts of FFN 32, top 2.
    "tiny-moe": dict(**_QWEN3_MOE, hidden_size=64, intermediate_size=176, moe_intermediate_size=32,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                     num_experts_per_tok=2, norm_topk_prob=True, vocab_size=512, max_position_embeddings=512,
                     rope_theta=10000.0, rms_norm_eps=1e-6),
    # Mixtral-8x7B-v0.1: 8 experts of FFN 14336, top 2, 46.7B parameters (12.9B per token).
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
                         tie_word_embeddings=False),
    # Qwen3-30B-A3B: 128 experts of FFN 768, top 8 renormalised, head_dim 128, 30.5B (3.3B per token).
    "qwen3-30b-a3b": dict(**_QWEN3_MOE, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
                          max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6),
    # OLMoE-1B-7B's shape (16 layers, 64 experts of FFN 1024, top 8; 6.9B, 1.3B per token) run as a
    # Qwen3-MoE layer (per-head q/k norms where OLMoE norms the whole q/k; top-k renormalised, as
    # llama.cpp's qwen3moe always does), on the built-in vocabulary.
    "olmoe-1b-7b": dict(**_QWEN3_MOE, hidden_size=2048, intermediate_size=1024, moe_intermediate_size=1024,
                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                        num_experts_per_tok=8, norm_topk_prob=True, vocab_size=49152,
                        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5),
}


# Shapes whose tokenizer is a built-in model's (hetero.model.sources.BUILTINS); their vocab_size is its.
BUILTIN_TOKENIZER: dict[str, str] = {"tinyllama-1.1b": "smollm2-135m", "llama2-7b-smol": "smollm2-135m",
                                     "olmoe-1b-7b": "smollm2-135m"}

# Bumped whenever tensor() would give other values, so no cached weights of an older rule are reused.
GENERATOR = 2


def config(name: str) -> dict[str, Any]:
    if name not in CONFIGS:
        raise HeteroError(f"unknown synthetic model {name!r}; known: {', '.join(sorted(CONFIGS))}")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
           "hidden_act": "silu", "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
           **CONFIGS[name]}
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return cfg


def tokenizer_gguf(name: str) -> Path | None:
    """The GGUF whose tokenizer the synthetic model `name` uses (None: the byte-level fallback)."""
    config(name)
    if name not in BUILTIN_TOKENIZER:
        return None
    from hetero.model.sources import builtin_path

    return builtin_path(BUILTIN_TOKENIZER[name])


def tensor_seed(name: str, seed: int = 0) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def tensor(name: str, shape: tuple[int, ...], seed: int = 0):
    """The synthetic value of canonical tensor `name` (bf16): norms 1, biases 0, matrices seeded by
    their name and scaled so activations stay O(1) through the layers, like a trained model's."""
    import torch

    if len(shape) == 1:
        return (torch.ones(shape) if "norm" in name else torch.zeros(shape)).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(tensor_seed(name, seed))
    t = torch.randn(shape, generator=gen)
    t.mul_(shape[-1] ** -0.5)
    return t.to(torch.bfloat16)


def weights_dir(name: str) -> Path:
    return cache_dir() / "synthetic" / f"{name}.g{GENERATOR}"


def ensure_weights(name: str, seed: int = 0, progress: bool = True) -> Path:
    """Write the seeded random weights of `name` once (bf16 safetensors); return the directory."""
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
        shard, shard_bytes, shards, index = {}, 0, [], {}
        names = expected_tensors(spec)
        from hetero.progress import progress_bar

        with progress_bar(f"writing synthetic:{name}", total=len(names), enabled=progress) as advance:
            for tname, shape in names:
                shard[tname] = tensor(tname, shape, seed)
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
