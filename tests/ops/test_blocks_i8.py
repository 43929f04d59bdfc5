"""Int8 activations for the decode GEMVs over GGUF blocks (kernels/blocks_i8.h; the default, or
HETERO_DECODE_ACT=int8):
each output is the exact dot of the file's weights with x rounded to int8 per block (32 values; 256
for Q4_K and Q6_K), a batched call gives each row the single call's bits, and the compiled decode stack gives
the per-layer path's logits in this mode too."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hetero.model.decoder import Decoder
from hetero.model.units import UnitConfig
from hetero.ops import kernels
from hetero.ops.blocks import dequantize_rows
from tests.ops.blocks_helpers import random_blocks
from tests.ops.test_native_model import SPEC, run, tiny_weights


def _vnni() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return all(f in flags for f in ("avx512_vnni", "avx512vbmi", "gfni"))


pytestmark = pytest.mark.skipif(kernels.get() is None or not _vnni(),
                                reason="compiled kernels or AVX512-VNNI/VBMI/GFNI unavailable here")


@pytest.fixture
def int8_mode():
    kernels.set_decode_act("int8")
    yield
    kernels.set_decode_act("bf16")


def int8_rounded(x: torch.Tensor, group: int) -> torch.Tensor:
    """x through the kernels' rounding: d = amax / 127 per group, q = nearest-even(x * (1 / d))."""
    xs = x.float().reshape(-1, group)
    d = xs.abs().amax(1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(xs * inv[:, None]).clamp(-127, 127)
    return (q.double() * d.double()[:, None]).reshape(-1)


@pytest.mark.parametrize("ggml_type,n,k", [("Q8_0", 40, 576), ("Q8_0", 9, 224), ("Q8_0", 3, 32), ("Q8_0", 17, 2048),
                                            ("Q4_0", 37, 576), ("Q4_0", 6, 96), ("Q4_1", 64, 2048), ("Q4_1", 5, 224),
                                            ("Q4_K", 33, 2048), ("Q4_K", 5, 256), ("Q6_K", 29, 2048),
                                            ("Q6_K", 3, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_gemv_is_the_exact_dot_with_x_rounded(ggml_type, n, k, dtype, int8_mode):
    m, kind = kernels.get(), kernels.kinds()[ggml_type.lower()]
    bt = random_blocks(ggml_type, n, k, seed=3, scale=1.0 / k ** 0.5)
    w = dequantize_rows(ggml_type, bt.data, k).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(k, generator=g).to(dtype)
    y = m.gemv_gguf(x, bt.data, kind, k, True).double()
    ref = w @ int8_rounded(x, 256 if ggml_type in ("Q4_K", "Q6_K") else 32)
    scale = ref.abs().max()
    assert scale > 0 and (y - ref).abs().max() / scale < 2e-6
    # the mode took effect: x in bf16 / fp32 gives other sums, off by about the int8 step
    kernels.set_decode_act("bf16")
    y0 = m.gemv_gguf(x, bt.data, kind, k, True).double()
    kernels.set_decode_act("int8")
    assert 1e-4 < (y - y0).abs().max() / scale < 5e-2
    # a batched call: each row the single call's bits (3 rows ride a 4-row pass, 6 and 7 an 8-row
    # one, 11 a pass of 8 then a padded 4)
    xb = torch.randn(11, k, generator=g).to(dtype)
    alone = torch.stack([m.gemv_gguf(xb[i], bt.data, kind, k, True) for i in range(11)])
    for M in (2, 3, 6, 7, 11):
        assert torch.equal(m.gemm_rows_gguf(xb[:M].contiguous(), bt.data, kind, k, True), alone[:M])


def test_mode_switch_and_status():
    kernels.set_decode_act("int8")
    try:
        assert kernels.decode_act() == "int8" and kernels.status()["decode_act"] == "int8"
    finally:
        kernels.set_decode_act("bf16")
    assert kernels.decode_act() == "bf16"
    with pytest.raises(ValueError):
        kernels.set_decode_act("int4")


@pytest.mark.parametrize("variant", ["mixed3", "uniform"])
def test_int8_decode_stack_gives_the_per_layer_logits(variant, int8_mode):
    """Linears mixing int8-loop kinds (Q4_0, Q4_K, Q6_K, Q8_0) with a bf16 one (Q5_K) in one stack."""
    kernels.set_enabled(True)
    net = Decoder.build(SPEC, tiny_weights(variant).get, default=UnitConfig(precision="native"))
    assert net._decode_stack() is not None
    tokens = torch.randint(0, SPEC.vocab_size, (1, 10), generator=torch.Generator().manual_seed(5))
    stacked = run(net, tokens, 4)
    net.stack_decode = False
    layered = run(net, tokens, 4)
    assert torch.equal(stacked, layered)
    kernels.set_decode_act("bf16")
    net.stack_decode = True
    plain = run(net, tokens, 4)
    # the logits move by about the activation rounding (a short prompt runs the row kernels, so the
    # int8 loops too)
    d = (plain - stacked).abs().max() / plain.abs().max()
    assert 0 < d < 0.1


@pytest.mark.parametrize("value,mode", [(None, "int8"), ("int8", "int8"), ("bf16", "bf16"), ("int4", "int8")])
def test_int8_is_the_default_the_env_switches_it_and_a_bad_value_says_so(value, mode):
    """A fresh process (no env: the default) on a CPU with the loops; a bad value keeps the default."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != kernels.DECODE_ACT_ENV}
    if value is not None:
        env[kernels.DECODE_ACT_ENV] = value
    r = subprocess.run([sys.executable, "-c", "from hetero.ops import kernels; print(kernels.decode_act())"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == mode
    assert ("ignored" in r.stderr) == (value == "int4")


def test_decode_perplexity_moves_by_the_activation_rounding(int8_mode):
    """`hetero eval --decode` scores through the decode step: in bf16 mode it gives the prefill's
    perplexity, in int8 mode a nearby one (the quality cost of the mode, measured the same way)."""
    from hetero.eval.perplexity import perplexity

    kernels.set_enabled(True)
    net = Decoder.build(SPEC, tiny_weights("mixed3").get, default=UnitConfig(precision="native"))
    ids = torch.randint(0, SPEC.vocab_size, (48,), generator=torch.Generator().manual_seed(7))
    i8 = perplexity(net, ids, 24, 12, progress=False, decode=True)
    kernels.set_decode_act("bf16")
    bf = perplexity(net, ids, 24, 12, progress=False, decode=True)
    pre = perplexity(net, ids, 24, 12, progress=False)
    assert abs(bf.nll - pre.nll) < 2e-3 * pre.nll, (bf.nll, pre.nll)
    assert 0 < abs(i8.nll - bf.nll) < 2e-2 * bf.nll, (i8.nll, bf.nll)
