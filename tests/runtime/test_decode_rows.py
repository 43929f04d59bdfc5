"""The compiled batched decode step (DecodeStack.step_rows over paged KV): each row of a batched
step gets exactly the logits and KV the one-token stack gives that sequence alone, for every
precision the stack runs (fp32, bf16, int8, int4, GGUF blocks, a linear of mixed block types)."""
from __future__ import annotations

import pytest
import torch

import hetero
from hetero.model.decoder import Decoder
from hetero.model.paged import Ragged, Segment
from hetero.model.units import UnitConfig
from hetero.ops import kernels

needs_kernels = pytest.mark.skipif(kernels.get() is None, reason="compiled kernels unavailable here")
BS = 4  # a small block: sequences span several, out of order in the pool


def _native_net(variant: str) -> Decoder:
    from tests.ops.test_native_model import SPEC, tiny_weights

    return Decoder.build(SPEC, tiny_weights(variant).get, default=UnitConfig(precision="native"))


@pytest.fixture(scope="module", params=["fp32", "bf16", "int8", "int4", "native-uniform", "native-mixed3"])
def net(request):
    kernels.set_enabled(True)
    p = request.param
    return _native_net(p.split("-")[1]) if p.startswith("native") else hetero.load("synthetic:tiny", dtype=p).net


def _blocks(seq: int, n: int, n_seqs: int) -> tuple[int, ...]:
    # interleaved over the pool (seq s holds blocks s, s + n_seqs, ..), so a wrong table reads another's
    return tuple(seq + n_seqs * j for j in range(n))


@needs_kernels
@pytest.mark.parametrize("lengths", [[3, 9, 1, 14, 6, 5, 11, 2], [4, 1, 12, 7, 2, 9, 3, 6, 10, 5, 8]])
def test_batched_rows_equal_each_sequence_alone(net, lengths):
    # 8 rows: one full pass of the row tiles; 11: a pass of 8 and one of 3 over the cached chunk
    assert net._decode_stack() is not None
    steps = 3
    B, V = len(lengths), net.spec.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (1, n), generator=g) for n in lengths]
    nb = -(-(max(lengths) + steps) // BS)
    kv = net.new_paged(B * nb, BS)
    caches, toks, alone = [], [], []
    for s, p in enumerate(prompts):  # each alone through the single path; its KV copied into its blocks
        cache = net.new_cache(1, p.shape[1] + steps)
        toks.append(int(net(p, 0, cache)[0].argmax()))
        caches.append(cache)
        for l in range(len(net.layers)):
            for j in range(p.shape[1]):
                b = _blocks(s, nb, B)[j // BS]
                kv.k[l][b, :, j % BS] = cache.k[l][0, :, j]
                kv.v[l][b, :, j % BS] = cache.v[l][0, :, j]
    for t in range(steps):
        segs = [Segment(lengths[s] + t, 1, _blocks(s, nb, B)) for s in range(B)]
        got = net.forward_ragged(torch.tensor(toks), Ragged(segs, BS), kv)
        alone = torch.stack([net(torch.tensor([[toks[s]]]), lengths[s] + t, caches[s])[0] for s in range(B)])
        assert got.shape == (B, V) and torch.equal(got, alone), (t, (got - alone).abs().max())
        toks = [int(r.argmax()) for r in got]
    for s in range(B):  # and every row's new K/V landed in its own blocks, as the cache has them
        for j in range(lengths[s], lengths[s] + steps):
            b = _blocks(s, nb, B)[j // BS]
            assert torch.equal(kv.k[-1][b, :, j % BS], caches[s].k[-1][0, :, j])
            assert torch.equal(kv.v[0][b, :, j % BS], caches[s].v[0][0, :, j])


@needs_kernels
def test_decode_rows_take_the_batched_stack_beside_a_prefill_chunk_too(monkeypatch):
    net = hetero.load("synthetic:tiny", dtype="int8").net
    stack, calls = net._decode_stack(), []
    monkeypatch.setattr(net, "_decode_stack", lambda: _Counting(stack, calls))
    kv = net.new_paged(8, BS)
    net.forward_ragged(torch.tensor([1, 2, 3]), Ragged([Segment(0, 3, (0,))], BS), kv)        # a prefill chunk
    assert calls == []
    # a decode row beside a chunk: the row through the stack, the chunk layer by layer
    net.forward_ragged(torch.tensor([4, 7, 8]), Ragged([Segment(3, 1, (0,)), Segment(0, 2, (1,))], BS), kv)
    assert calls == [1]
    net.forward_ragged(torch.tensor([5, 9]), Ragged([Segment(4, 1, (0, 2)), Segment(2, 1, (1,))], BS), kv)
    assert calls == [1, 2]


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_a_decode_row_gets_the_same_logits_with_or_without_a_prefill_chunk_beside_it(dtype):
    # the same sequence stepped twice from the same KV: once alone, once with a prompt's chunk in
    # the step (the chunk's own logits are those it gets alone as well)
    net = hetero.load("synthetic:tiny", dtype=dtype).net
    kv = net.new_paged(12, BS)
    g = torch.Generator().manual_seed(3)
    p, q = torch.randint(0, net.spec.vocab_size, (9,), generator=g), torch.randint(0, net.spec.vocab_size, (7,), generator=g)
    a, b = (0, 1, 2), (3, 4)
    net.forward_ragged(p, Ragged([Segment(0, 9, a)], BS), kv)
    tok = torch.tensor([5])
    alone = net.forward_ragged(tok, Ragged([Segment(9, 1, a)], BS), kv)
    chunk_alone = net.forward_ragged(q, Ragged([Segment(0, 7, b)], BS), kv)
    both = net.forward_ragged(torch.cat([tok, q]), Ragged([Segment(9, 1, a), Segment(0, 7, b)], BS), kv)
    assert torch.equal(both[0], alone[0]) and torch.equal(both[1], chunk_alone[0])


class _Counting:
    """The stack with its batched step counted (rows per call)."""

    def __init__(self, stack, calls):
        self._s, self._calls = stack, calls

    def step_rows(self, x, *a):
        self._calls.append(x.shape[0])
        return self._s.step_rows(x, *a)


@needs_kernels
def test_step_rows_refuses_bad_tables():
    net = hetero.load("synthetic:tiny", dtype="fp32").net
    kv = net.new_paged(2, BS)
    stack = net._decode_stack()
    x = torch.zeros(1, net.spec.hidden_size)
    cs = torch.zeros(1, net.spec.head_dim)
    with pytest.raises(RuntimeError, match="block id out of range"):
        stack.step_rows(x, torch.tensor([0]), cs, cs, kv.k, kv.v, torch.tensor([[5]]))
    with pytest.raises(RuntimeError, match="past its block table"):
        stack.step_rows(x, torch.tensor([BS]), cs, cs, kv.k, kv.v, torch.tensor([[0]]))
