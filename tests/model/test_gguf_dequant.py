"""The whole-tensor GGUF dequantisation gives the gguf package's values bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from hetero.model.gguf_dequant import dequantize
from hetero.model.gguf_index import read_tensor, tensor_table
from hetero.model.sources import builtin_path

TYPES = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0]


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_bit_identical_to_the_gguf_package(qt):
    rng = np.random.default_rng(int(qt))
    w = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 10, (48, 1))).astype(np.float32)
    w[3] = 0.0                    # a block whose scale is 0
    w[5, :32] = 7.25              # a constant block (Q4_1: max == min)
    q = quants.quantize(w, qt)
    ref = quants.dequantize(q, qt)
    got = dequantize(q.reshape(-1), int(qt)).reshape(ref.shape)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_other_types_are_left_to_the_gguf_package():
    assert dequantize(np.zeros(210, np.uint8), int(GGMLQuantizationType.Q6_K)) is None


def test_the_builtin_model_reads_as_the_gguf_package_reads_it():
    path = builtin_path("smollm2-135m")
    table = tensor_table(path)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
        info = table[name]
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
        qt = GGMLQuantizationType(info.ggml_type)
        block, size = quants.GGML_QUANT_SIZES[qt]
        ref = quants.dequantize(np.asarray(mm).reshape(-1, info.shape[-1] // block * size), qt).reshape(info.shape)
        got = read_tensor(path, info)
        assert got.shape == info.shape and np.array_equal(got.view(np.uint32), ref.astype(np.float32).view(np.uint32))
