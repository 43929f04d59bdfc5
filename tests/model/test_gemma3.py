"""Gemma 3 equals transformers' Gemma3ForCausalLM on a tiny random checkpoint (fp32, max abs error
<= 1e-4): prefill, cached decode, and runs longer than the sliding window (local layers then keep a
ring of `window` slots). Also the spec's KV bytes and the HF/GGUF name and norm conventions."""
from __future__ import annotations

import pytest
import torch

import hetero
from hetero.errors import HeteroError
from hetero.model.hf import spec_from_hf_dir

TOL = 1e-4
WINDOW = 6


def write_tiny_gemma3(out, seed: int = 0, **extra):
    """A random Gemma 3 text model (layers 0, 1 local and 2 global, as sliding_window_pattern 3 makes
    them) written as an HF dir; returns the transformers model (fp32, eval)."""
    import transformers

    cfg = transformers.Gemma3TextConfig(**{**dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=256, max_position_embeddings=256,
        sliding_window=WINDOW, sliding_window_pattern=3, query_pre_attn_scalar=24,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}), **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # HF holds w of x * (1 + w): small random values
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(out), safe_serialization=True)
    return model


def test_spec_reads_the_local_layout(tmp_path):
    write_tiny_gemma3(tmp_path)
    spec = spec_from_hf_dir(tmp_path)
    assert spec.architecture == "gemma3" and spec.tie_embeddings
    assert spec.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    assert (spec.sliding_window, spec.rope_local_theta, spec.rope_theta) == (WINDOW, 10000.0, 1e6)
    assert spec.query_pre_attn_scalar == 24
    # KV bytes: the two local layers hold WINDOW positions at most, the global one every position
    per_layer_token = 2 * spec.kv_dim * 2
    assert spec.kv_bytes(100, "bf16") == per_layer_token * (WINDOW + WINDOW + 100)
    assert spec.kv_bytes(4, "bf16") == per_layer_token * 12
    from hetero import cost

    assert cost.kv_bytes(spec, "layers.0", "bf16", 100, 1) == per_layer_token * WINDOW
    assert cost.kv_bytes(spec, "layers.2", "bf16", 100, 1) == per_layer_token * 100


@pytest.mark.parametrize("prompt_len", [4, 15])   # inside the window, and over twice its length
def test_prefill_and_cached_decode_match_transformers(tmp_path, prompt_len):
    ref = write_tiny_gemma3(tmp_path)
    net = hetero.load(str(tmp_path), dtype="fp32").net
    g = torch.Generator().manual_seed(1)
    full = torch.randint(0, 256, (1, prompt_len + 10), generator=g)
    with torch.no_grad():
        want = ref(full).logits[0]                                           # [P + 10, V]
    cache = net.new_cache(1, full.shape[1])
    assert [k.shape[2] for k in cache.k] == [WINDOW, WINDOW, full.shape[1]]  # rings for the local layers
    got = net(full[:, :prompt_len], 0, cache, last_only=False)[0]
    assert (got - want[:prompt_len]).abs().max().item() <= TOL
    for pos in range(prompt_len, full.shape[1]):                             # 10 cached decode steps
        got = net(full[:, pos:pos + 1], pos, cache)[0]
        assert (got - want[pos]).abs().max().item() <= TOL, f"decode at {pos}"


def test_chunked_prefill_across_the_ring_equals_one_shot(tmp_path):
    write_tiny_gemma3(tmp_path)
    net = hetero.load(str(tmp_path)).net
    ids = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(2))
    one = net(ids, 0, net.new_cache(1, 23), last_only=False)
    cache = net.new_cache(1, 23)
    parts = [net(ids[:, a:b], a, cache, last_only=False) for a, b in ((0, 5), (5, 14), (14, 16), (16, 23))]
    torch.testing.assert_close(torch.cat(parts, dim=1), one, atol=1e-5, rtol=0)


def test_bf16_follows_fp32(tmp_path):
    write_tiny_gemma3(tmp_path)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    a = hetero.load(str(tmp_path), dtype="fp32").net
    b = hetero.load(str(tmp_path), dtype="bf16").net
    la, lb = a(ids, 0, a.new_cache(1, 12)), b(ids, 0, b.new_cache(1, 12))
    assert (la - lb).abs().max() < 0.05 * la.abs().max()


def test_unsupported_gemma_features_are_refused(tmp_path):
    write_tiny_gemma3(tmp_path, final_logit_softcapping=30.0)
    with pytest.raises(HeteroError, match="final_logit_softcapping"):
        spec_from_hf_dir(tmp_path)


def test_gguf_names_follow_the_architecture():
    from hetero.model.gguf import canonical_name

    assert canonical_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert canonical_name("blk.3.ffn_norm.weight", "gemma3") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert canonical_name("blk.3.post_attention_norm.weight", "gemma3") == "model.layers.3.post_attention_layernorm.weight"
    assert canonical_name("blk.0.attn_q_norm.weight", "gemma3") == "model.layers.0.self_attn.q_norm.weight"
