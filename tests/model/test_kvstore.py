"""KV stores (model/kvstore.py): int8 rows round to within half a step of their absmax grid, and a
store indexed as a cache tensor reads back what was written, contiguous or paged."""
from __future__ import annotations

import pytest
import torch

from hetero.errors import HeteroError
from hetero.model.kvstore import CastKV, Int8KV, new_store, quantize_rows


def test_int8_rows_are_within_half_a_step_of_their_scale():
    x = torch.randn(3, 2, 7, 64) * torch.rand(3, 2, 7, 1) * 10
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (3, 2, 7, 1)
    assert int(codes.abs().max()) <= 127
    err = (codes.float() * scale.float() - x).abs()
    # rounding to the stored (fp16) scale's grid: half a step, plus the fp16 rounding of the scale
    # moving the top code (at most 127 * 2^-11 of a step)
    assert bool((err <= scale.float() * (0.5 + 127 * 2 ** -11) + 1e-7).all())
    # every row uses its range: the largest value lands on (or next to) code 127
    assert int(codes.abs().amax(-1).min()) >= 126


def test_a_zero_row_stays_zero_and_finite():
    codes, scale = quantize_rows(torch.zeros(2, 16))
    assert bool((codes == 0).all()) and bool(torch.isfinite(scale).all()) and bool((scale > 0).all())


def test_int8_store_reads_back_contiguous_and_paged_writes():
    # a cache [B, K, L, D]: a prefill slice, then one decode position
    s = Int8KV((1, 2, 10, 16), torch.float32, "cpu")
    a, b = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 1, 16)
    s[:, :, 0:4] = a
    s[:, :, 4:5] = b
    got = s[:, :, :5]
    assert got.dtype == torch.float32 and got.shape == (1, 2, 5, 16)
    want = torch.cat([a, b], dim=2)
    assert float((got - want).abs().max()) <= float(want.abs().max()) / 127
    assert float(s[:, :, 5:].abs().max()) == 0.0
    # a paged pool [n, K, block, D]: tokens to (block, offset), a gather of whole blocks
    pool = Int8KV((4, 2, 8, 16), torch.bfloat16, "cpu")
    blocks, offs = torch.tensor([2, 2, 0]), torch.tensor([0, 1, 5])
    new = torch.randn(3, 2, 16)
    pool[blocks, :, offs] = new
    back = pool[torch.tensor([[2, 0]])]                                 # [1, 2, K, block, D]
    assert back.dtype == torch.bfloat16 and back.shape == (1, 2, 2, 8, 16)
    assert torch.allclose(back[0, 0, :, 0].float(), new[0], atol=float(new[0].abs().max()) / 100)
    assert torch.allclose(back[0, 1, :, 5].float(), new[2], atol=float(new[2].abs().max()) / 100)
    assert pool.nbytes() == 4 * 2 * 8 * (16 + 2)                        # D codes + a fp16 scale a row


def test_new_store_is_a_plain_tensor_when_the_cache_is_the_layers_dtype():
    assert isinstance(new_store((1, 1, 2, 16), "auto", torch.bfloat16, "cpu"), torch.Tensor)
    assert isinstance(new_store((1, 1, 2, 16), "bf16", torch.bfloat16, "cpu"), torch.Tensor)
    cast = new_store((1, 1, 2, 16), "bf16", torch.float32, "cpu")
    assert isinstance(cast, CastKV)
    cast[:, :, 0:1] = torch.full((1, 1, 1, 16), 1 / 3)
    assert cast[:, :, 0:1].dtype == torch.float32
    assert float(cast[:, :, 0:1][0, 0, 0, 0]) == float(torch.tensor(1 / 3).to(torch.bfloat16))
    with pytest.raises(HeteroError, match="KV dtype"):
        new_store((1, 1, 2, 16), "int4", torch.float32, "cpu")
