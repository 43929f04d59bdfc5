"""Tiny models written to a temp dir for the fuzz tests: synthetic:tiny as an HF safetensors dir and
as a GGUF file with a small byte-level BPE tokenizer, so each case loads in milliseconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 512


def _byte_chars() -> list[str]:
    # GPT-2's byte -> printable character table (the byte-level BPE alphabet).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _tokens_and_merges() -> tuple[list[str], list[str]]:
    chars = _byte_chars()
    tokens, merges = list(chars), []
    letters = "etaoinshrdlucmfw"
    for a in letters:
        for b in letters:
            if len(tokens) >= VOCAB - 2:
                break
            merges.append(f"{a} {b}")
            tokens.append(a + b)
    tokens += ["<|endoftext|>", "<|im_end|>"]
    return tokens, merges


def tiny_tensors(seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """config.json dict and fp32 weights (canonical names) of synthetic:tiny."""
    import torch

    from hetero.model.hf import spec_from_config
    from hetero.model.spec import expected_tensors
    from hetero.model.synthetic import config

    cfg = config("tiny")
    spec = spec_from_config(cfg, source="synthetic:tiny", fmt="synthetic")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_tensors(spec):
        if len(shape) == 1:
            out[name] = np.ones(shape, dtype=np.float32)
        else:
            out[name] = (torch.randn(shape, generator=gen) * 0.05).numpy()
    return cfg, out


def write_hf(d: Path, seed: int = 0) -> Path:
    from safetensors.numpy import save_file

    cfg, tensors = tiny_tensors(seed)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return d


def write_gguf(path: Path, seed: int = 0) -> Path:
    """synthetic:tiny as a llama GGUF: Q8_0 where the row length allows, F32 otherwise."""
    import gguf

    from hetero.compress.gguf_export import _permute, gguf_name, quantize

    cfg, tensors = tiny_tensors(seed)
    tokens, merges = _tokens_and_merges()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(VOCAB - 2)
    w.add_eos_token_id(VOCAB - 1)
    w.add_chat_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    for name, arr in tensors.items():
        if name.endswith("q_proj.weight"):
            arr = _permute(arr, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            arr = _permute(arr, cfg["num_key_value_heads"])
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 2 and arr.shape[1] % 32 == 0:
            w.add_tensor(gguf_name(name), quantize(arr, "Q8_0"), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
