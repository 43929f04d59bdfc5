"""The compiled whole-stack decode step (one call per token) agrees with the per-layer fused path."""
from __future__ import annotations

import pytest
import torch

import hetero
from hetero.model.llama import DecoderLayer, compile_decode_stack
from hetero.model.units import UnitConfig
from hetero.ops import kernels
from tests.model.helpers import write_tiny_checkpoint

needs_kernels = pytest.mark.skipif(kernels.get() is None, reason="compiled kernels unavailable here")


@pytest.fixture(autouse=True)
def _restore():
    kernels.set_enabled(True)
    yield
    kernels.set_enabled(True)


def _decode(net, prompt: torch.Tensor, n: int, stacked: bool, layer_calls: list | None = None):
    """Greedy ids, the logits of each step and the K cache, with the stack on or off."""
    net.stack_decode = stacked
    cache = net.new_cache(1, prompt.shape[1] + n)
    logits = net(prompt, 0, cache)
    if layer_calls is not None:
        layer_calls.clear()
    toks, steps = [], []
    for i in range(n):
        toks.append(int(logits[0].argmax()))
        steps.append(logits[0])
        logits = net(torch.tensor([[toks[-1]]]), prompt.shape[1] + i, cache)
    net.stack_decode = True
    return toks, torch.stack(steps), torch.stack([k[0] for k in cache.k])


@pytest.fixture
def count_layer_calls(monkeypatch):
    calls = []
    forward = DecoderLayer.forward

    def counted(self, *a, **k):
        calls.append(1)
        return forward(self, *a, **k)

    monkeypatch.setattr(DecoderLayer, "forward", counted)
    return calls


@needs_kernels
@pytest.mark.parametrize("source", ["synthetic:tiny", "hf:qwen2_bias", "hf:mistral_gqa"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int4"])
def test_stack_matches_per_layer_decode(source, dtype, tmp_path, count_layer_calls):
    if source.startswith("hf:"):  # qwen2: qkv bias; mistral: GQA; tiny: an MLP width int4 must pad (176)
        write_tiny_checkpoint(source[3:], tmp_path)
        source = str(tmp_path)
    net = hetero.load(source, dtype=dtype).net
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    ref = _decode(net, prompt, 10, stacked=False)
    got = _decode(net, prompt, 10, stacked=True, layer_calls=count_layer_calls)
    assert net._decode_stack() is not None and net._decode_stack().n_layers() == len(net.layers)
    assert count_layer_calls == []  # the decode steps never ran a layer's own forward
    assert got[0] == ref[0]
    # Same math with the same bf16 rounding points: fp32 differs by summation order at most, the
    # bf16-activation precisions by less than one bf16 step of the logits (measured: identical).
    tol = 1e-5 if dtype == "fp32" else 1e-2
    torch.testing.assert_close(got[1], ref[1], atol=tol, rtol=0)
    torch.testing.assert_close(got[2].float(), ref[2].float(), atol=tol, rtol=0)


@needs_kernels
@pytest.mark.slow  # the real model: ~10 s to load and quantise
def test_stack_matches_per_layer_decode_smollm2_int4():
    model = hetero.load("smollm2-135m", dtype="int4")
    net = model.net
    prompt = torch.tensor([model.prompt_ids("Write a long story about a dragon who learns to cook.")])
    ref = _decode(net, prompt, 6, stacked=False)
    got = _decode(net, prompt, 6, stacked=True)
    assert net._decode_stack() is not None
    assert got[0] == ref[0]
    torch.testing.assert_close(got[1], ref[1], atol=0.25, rtol=0)  # one bf16 step at |logit| ~ 32


@needs_kernels
def test_stack_steps_aside_for_hooks_mixed_dtypes_and_missing_kernels(tmp_path, count_layer_calls):
    net = hetero.load("synthetic:tiny", dtype="int4").net
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(1))
    stacked = _decode(net, prompt, 4, stacked=True)
    # A hook on a layer (per-unit timings) must see that layer run: the stack steps aside.
    handle = net.layers[1].register_forward_hook(lambda *a: None)
    assert net._decode_stack() is None
    hooked = _decode(net, prompt, 4, stacked=True, layer_calls=count_layer_calls)
    assert len(count_layer_calls) == 4 * len(net.layers)
    handle.remove()
    assert hooked[0] == stacked[0]
    # Layers whose activations differ in dtype (fp32 next to int4) run one by one.
    mixed = hetero.load("synthetic:tiny", dtype="int4", units={"layers.0": UnitConfig("cpu", "fp32")}).net
    assert compile_decode_stack(list(mixed.layers)) is None
    assert len(_decode(mixed, prompt, 3, stacked=True)[0]) == 3
    # Without the compiled kernels there is no stack; decoding still works (stock torch path).
    kernels.set_enabled(False)
    plain = hetero.load("synthetic:tiny", dtype="int4").net
    assert plain._decode_stack() is None
    assert len(_decode(plain, prompt, 3, stacked=True)[0]) == 3
