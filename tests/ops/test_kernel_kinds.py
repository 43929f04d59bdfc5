"""Python and the compiled decode stack agree on the kind of each linear layer: the codes come from
the C++ module, and the stack reads each code as the layer it was given."""
from __future__ import annotations

import pytest
import torch

from hetero.ops import kernels
from hetero.ops.linear import gemv_operands, make_linear

needs_kernels = pytest.mark.skipif(kernels.get() is None, reason="compiled kernels unavailable here")
H, K, D, E, I = 2, 1, 16, 64, 64  # heads, kv heads, head dim, hidden, MLP width (int4-friendly)
SHAPES = [((H + 2 * K) * D, E), (E, H * D), (2 * I, E), (E, I)]  # qkv, o, gate_up, down


def layer(precision: str):
    g = torch.Generator().manual_seed(0)
    return [make_linear(torch.randn(n, k, generator=g), None, precision) for n, k in SHAPES]


def add(stack, ops, kinds):
    _, w, s, b = (list(t) for t in zip(*ops))
    stack.add_layer(kinds, w, s, b, torch.ones(E), torch.ones(E))


@needs_kernels
def test_the_module_defines_every_kind_once():
    k = kernels.kinds()
    assert set(k) == {"fp32", "bf16", "int8", "int4", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"}
    assert len(set(k.values())) == len(k)
    assert k == dict(kernels.get().kinds())


@needs_kernels
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_each_layer_gets_its_own_kind_and_the_stack_reads_it_so(precision):
    kernels.set_enabled(True)
    ops = [gemv_operands(lin) for lin in layer(precision)]
    assert all(op is not None and op[0] == kernels.kinds()[precision] for op in ops)
    stack = kernels.get().DecodeStack(H, K, D, E, I, 1e-5, 0.25, precision != "fp32")
    add(stack, ops, [op[0] for op in ops])
    assert stack.n_layers() == 1
    # Any other kind for the same tensors is refused: the code means this layer's layout and no other.
    for other, code in kernels.kinds().items():
        if other != precision:
            with pytest.raises(RuntimeError):
                add(stack, ops, [code] * 4)
    assert stack.n_layers() == 1


def test_without_kernels_no_kind_is_needed():
    kernels.set_enabled(False)
    try:
        assert all(gemv_operands(lin) is None for lin in layer("int4") + layer("bf16"))
    finally:
        kernels.set_enabled(True)
