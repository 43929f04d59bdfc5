"""Tiny random HF checkpoints written with transformers, for parity tests."""
from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False)

VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict()),
    "mistral_gqa": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=256,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32))),
}


def write_tiny_checkpoint(variant: str, out: Path, seed: int = 0):
    """Write a random tiny model of `variant` as an HF dir; return the transformers model (fp32, eval)."""
    import transformers

    cfg_cls, model_cls, extra = VARIANTS[variant]
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        # Non-trivial norm weights and biases so that every parameter matters in the comparison.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(out), safe_serialization=True)
    return model
