"""Our decoder equals transformers' reference on tiny random configs (fp32, max abs error ≤ 1e-4)."""
from __future__ import annotations

import pytest
import torch

import hetero
from tests.model.helpers import VARIANTS, write_tiny_checkpoint

TOL = 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_and_cached_decode_match_transformers(variant, tmp_path):
    ref = write_tiny_checkpoint(variant, tmp_path)
    ours = hetero.load(str(tmp_path), dtype="fp32")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (1, 11), generator=g)
    steps = torch.randint(0, 256, (1, 8), generator=g)
    full = torch.cat([prompt, steps], dim=1)
    with torch.no_grad():
        want = ref(full).logits[0]                                        # [19, V]

    net = ours.net
    cache = net.new_cache(1, full.shape[1])
    got_prefill = net(prompt, 0, cache, last_only=False)[0]               # [11, V]
    torch.testing.assert_close(got_prefill, want[:11], atol=TOL, rtol=0)
    for i in range(steps.shape[1]):                                       # 8 cached decode steps
        pos = prompt.shape[1] + i
        got = net(full[:, pos:pos + 1], pos, cache)[0]
        assert (got - want[pos]).abs().max().item() <= TOL, f"decode step {i}"


def test_chunked_prefill_equals_one_shot(tmp_path):
    write_tiny_checkpoint("mistral_gqa", tmp_path)
    net = hetero.load(str(tmp_path)).net
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    one = net(ids, 0, net.new_cache(1, 20), last_only=False)
    cache = net.new_cache(1, 20)
    a = net(ids[:, :7], 0, cache, last_only=False)
    b = net(ids[:, 7:], 7, cache, last_only=False)
    torch.testing.assert_close(torch.cat([a, b], dim=1), one, atol=1e-5, rtol=0)


def test_bf16_close_to_fp32(tmp_path):
    write_tiny_checkpoint("llama", tmp_path)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    f32 = hetero.load(str(tmp_path), dtype="fp32").net
    b16 = hetero.load(str(tmp_path), dtype="bf16").net
    a = f32(ids, 0, f32.new_cache(1, 9))
    b = b16(ids, 0, b16.new_cache(1, 9))
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert a.argmax() == b.argmax()
