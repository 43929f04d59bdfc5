"""Quantised embedding tables: as small as the planner prices them, close to the dense rows."""
from __future__ import annotations

import pytest
import torch

from hetero.dtypes import weight_bytes
from hetero.ops.embedding import QuantEmbedding, make_embedding


@pytest.mark.parametrize("precision,tol", [("int8", 0.01), ("int4", 0.1)])
@pytest.mark.parametrize("shape", [(96, 64), (40, 200)])
def test_rows_close_and_bytes_as_priced(precision, tol, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    table = make_embedding(w, precision)
    assert isinstance(table, QuantEmbedding)
    assert table.weight.numel() * table.weight.element_size() == weight_bytes(precision, shape)
    ids = torch.tensor([[0, 5, 5], [shape[0] - 1, 2, 7]])
    got = table[ids]
    assert got.shape == (2, 3, shape[1]) and got.dtype == torch.bfloat16
    err = (got.float() - w[ids]).norm() / w[ids].norm()
    assert err < tol


def test_decode_of_row_bytes_equals_lookup():
    # A table on disk is read row by row and decoded: that must equal the in-memory lookup.
    w = torch.randn(50, 72)
    table = make_embedding(w, "int4")
    rows = table.weight[torch.tensor([3, 9])].clone()
    torch.testing.assert_close(table.decode(rows), table[torch.tensor([3, 9])])


def test_dense_precisions_stay_tensors():
    w = torch.randn(8, 16)
    assert make_embedding(w, "bf16").dtype == torch.bfloat16
    assert make_embedding(w, "fp32").data_ptr() == w.data_ptr()  # no copy at the stored precision
