"""Batched decode (runtime/batch.py over runtime/kvcache.py): every request in a batch gets what it
would get alone through the single-sequence path, and the KV pool queues what does not fit."""
from __future__ import annotations

import pytest
import torch

import hetero
from hetero.errors import HeteroError
from hetero.runtime.batch import ROWS_CHUNK, BatchRunner
from hetero.runtime.generate import generate_step
from hetero.runtime.kvcache import KVPool
from hetero.runtime.sampling import Sampler, SamplingParams
from tests.model.helpers import write_tiny_checkpoint

LENGTHS = (5, 17, 40, 1, 70, 9)


@pytest.fixture(scope="module")
def nets():
    return {p: hetero.load("synthetic:tiny", dtype=p).net for p in ("fp32", "int8", "int4")}


def _prompts(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _alone(net, prompt, n, params=SamplingParams(), stop_ids=frozenset()):
    return [t for t, _ in generate_step(net, prompt, n, Sampler(params), set(stop_ids))]


def _collect(runner, out, steps=None):
    i = 0
    while not runner.idle and (steps is None or i < steps):
        for ev in runner.step():
            out.setdefault(ev.request, []).append(ev.token)
        i += 1
    return out


def _collect_widest(runner):
    """Every request's tokens, stepping until idle, and the most decode rows one step ran."""
    out, widest = {}, 0
    while not runner.idle:
        for ev in runner.step():
            out.setdefault(ev.request, []).append(ev.token)
        widest = max(widest, runner.last_decode_rows)
    return out, widest


def _net(nets, precision):
    """`native-i8`: the GGUF-block net with int8 decode activations (the default on a CPU with the
    loops; the suite runs bf16, tests/conftest.py, which resets it after the test)."""
    if precision == "native-i8":
        from hetero.ops import kernels

        kernels.set_decode_act("int8")
    net = _native_net() if precision.startswith("native") else nets[precision]
    assert precision != "native-i8" or kernels.decode_act() == "int8" or not kernels.status()["active"]
    return net


def _native_net():
    from tests.ops.test_native_model import SPEC, tiny_weights
    from hetero.model.decoder import Decoder
    from hetero.model.units import UnitConfig

    return Decoder.build(SPEC, tiny_weights("mixed3").get, default=UnitConfig(precision="native"))


@pytest.mark.parametrize("precision,prefill", [("fp32", 16), ("fp32", 512), ("int8", 512), ("int4", 512),
                                               ("native", 512), ("native-i8", 512)])
def test_batched_greedy_equals_each_request_alone(nets, precision, prefill):
    # Mixed lengths; half join after a few steps, while the first half decode. Quantised layers
    # (bf16 activations) give the single path's bits only for a prompt cut into the same chunks
    # (the single path's 512); fp32 also with the prompts cut into 16-token pieces. GGUF blocks
    # (native) too.
    net = _net(nets, precision)
    # (the native test model's context is 64)
    prompts, n_new = _prompts((5, 17, 30, 1, 40, 9) if precision.startswith("native") else LENGTHS), [12, 7, 10, 15, 6, 11]
    ref = [_alone(net, p, n) for p, n in zip(prompts, n_new)]
    runner = BatchRunner(net, kv_bytes=4 << 20, max_batch=8, prefill_tokens=prefill)
    ids = [runner.add(p, n) for p, n in zip(prompts[:3], n_new[:3])]
    out = _collect(runner, {}, steps=4)
    assert runner.running and not runner.queue  # the late ones really join a running batch
    ids += [runner.add(p, n) for p, n in zip(prompts[3:], n_new[3:])]
    _collect(runner, out)
    assert [out[i] for i in ids] == ref
    # every decode step after the first joins ran several sequences in one forward
    assert runner.steps < sum(n_new)


@pytest.mark.parametrize("precision,batch", [("native", 8), ("native", 16), ("native-i8", 16), ("int4", 16),
                                             ("int8", 8), ("fp32", 16)])
def test_full_batches_equal_each_request_alone(nets, precision, batch):
    # B = 8 and 16 running at once (the batched decode stack's steps), GGUF blocks included
    net = _net(nets, precision)
    lengths = [(7 * i) % 23 + 1 for i in range(batch)]
    prompts, n_new = _prompts(lengths, seed=batch), [6 + i % 5 for i in range(batch)]
    ref = [_alone(net, p, n) for p, n in zip(prompts, n_new)]
    runner = BatchRunner(net, kv_bytes=4 << 20, max_batch=batch)
    ids = [runner.add(p, n) for p, n in zip(prompts, n_new)]
    out, widest = _collect_widest(runner)
    assert widest == batch and [out[i] for i in ids] == ref


def test_a_load_beyond_the_pool_queues_and_completes(nets):
    net = nets["fp32"]
    prompts = _prompts((20, 30, 12, 25, 8), seed=3)
    ref = [_alone(net, p, 10) for p in prompts]
    pool = KVPool(net, n_blocks=6, block=16)   # 96 tokens: two or three of these at a time
    runner = BatchRunner(net, pool=pool, max_batch=8)
    ids = [runner.add(p, 10) for p in prompts]
    out, peak_running, waited = {}, 0, False
    while not runner.idle:
        for ev in runner.step():
            out.setdefault(ev.request, []).append(ev.token)
        peak_running = max(peak_running, len(runner.running))
        waited |= bool(runner.queue) and bool(runner.running)
        assert pool.used_blocks <= pool.n_blocks
        assert pool.used_blocks == sum(pool.blocks_for(s.total) for s in runner.running)
    assert waited and 1 < peak_running < len(prompts)
    assert [out[i] for i in ids] == ref
    assert pool.free_blocks == pool.n_blocks and not pool.tables


def test_requests_that_can_never_run_are_refused_at_once(nets):
    net = nets["fp32"]
    runner = BatchRunner(net, pool=KVPool(net, n_blocks=2, block=16))
    with pytest.raises(HeteroError, match="KV blocks"):
        runner.add(list(range(20)), 20)            # 40 tokens > 32 in the whole pool
    with pytest.raises(HeteroError, match="empty prompt"):
        runner.add([], 4)
    with pytest.raises(HeteroError, match="max_new_tokens"):
        runner.add([1, 2], 0)
    with pytest.raises(HeteroError, match="holds no block"):
        KVPool(net, budget_bytes=100)
    assert runner.idle


def test_per_request_sampling_and_stops_inside_one_batch(nets):
    net = nets["fp32"]
    p = _prompts((11, 6, 23), seed=5)
    hot = SamplingParams(temperature=0.9, top_k=40, seed=7)
    greedy = _alone(net, p[2], 12)
    stop = {greedy[4]}
    ref = [_alone(net, p[0], 12), _alone(net, p[1], 12, hot), _alone(net, p[2], 12, stop_ids=stop)]
    assert ref[1] != _alone(net, p[1], 12)          # the sampled one really differs from greedy
    runner = BatchRunner(net, kv_bytes=1 << 20)
    ids = [runner.add(p[0], 12), runner.add(p[1], 12, hot), runner.add(p[2], 12, stop_ids=stop)]
    events = []
    while not runner.idle:
        events += runner.step()
    by = {i: [e for e in events if e.request == i] for i in ids}
    assert [[e.token for e in by[i]] for i in ids] == ref
    assert by[ids[2]][-1].finish_reason == "stop" and len(by[ids[2]]) == ref[2].index(greedy[4]) + 1
    assert by[ids[0]][-1].finish_reason == "length"
    assert [e.finish_reason for e in events].count(None) == len(events) - 3


def test_cancel_returns_the_blocks(nets):
    net = nets["fp32"]
    runner = BatchRunner(net, pool=KVPool(net, n_blocks=4, block=16))
    a, b = runner.add([1, 2, 3], 40), runner.add([4, 5], 40)   # b waits: a holds 3 of 4 blocks
    runner.step()
    assert runner.pool.free_blocks == 1 and len(runner.queue) == 1
    assert runner.cancel(a) and runner.pool.free_blocks == 4
    runner.step()
    assert [s.id for s in runner.running] == [b] and runner.cancel(b) and runner.idle
    assert runner.pool.free_blocks == 4 and not runner.cancel(a)


@pytest.mark.parametrize("variant", ["qwen2_bias"])  # tiny itself has grouped heads
def test_qkv_bias_batches_too(variant, tmp_path):
    write_tiny_checkpoint(variant, tmp_path)
    net = hetero.load(str(tmp_path), dtype="fp32").net
    prompts = _prompts((4, 13, 7), seed=1)
    ref = [_alone(net, p, 8) for p in prompts]
    runner = BatchRunner(net, kv_bytes=1 << 20)
    ids = [runner.add(p, 8) for p in prompts]
    out = runner.run()
    assert [out[i] for i in ids] == ref


def test_gemma3_batched_is_refused_clearly(tmp_path):
    from tests.model.test_gemma3 import write_tiny_gemma3

    write_tiny_gemma3(tmp_path)
    net = hetero.load(str(tmp_path), dtype="fp32").net
    with pytest.raises(HeteroError, match="batched decode does not run gemma3"):
        BatchRunner(net, kv_bytes=1 << 20)


def test_run_batch_gives_each_prompt_its_own_greedy_text(tmp_path, capsys):
    import json

    from hetero.commands.run_batch import read_prompts, run_batch

    prompts = ["Hello there", "The capital of France is", "Once upon a time, far away"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    assert read_prompts(str(tmp_path / "p.txt")) == prompts
    m = hetero.load("synthetic:tiny", dtype="int8")
    run_batch(m.engine, prompts, 2, 6, SamplingParams(), False, as_json=True)
    d = json.loads(capsys.readouterr().out)
    stops = m.tokenizer.stop_ids
    for p, c in zip(prompts, d["completions"]):
        alone = [t for t in _alone(m.net, m.prompt_ids(p, chat=False), 6, stop_ids=stops) if t not in stops]
        assert c["prompt"] == p and c["token_ids"] == alone and c["text"] == m.tokenizer.decode(alone)
    assert d["batch"] == 2 and d["requests"] == 3 and d["decode_tok_s"] > 0
    with pytest.raises(HeteroError, match="no prompt"):
        (tmp_path / "e.txt").write_text("\n \n")
        read_prompts(str(tmp_path / "e.txt"))


def test_bench_batches_reports_a_rate_per_size(nets):
    from hetero.bench.batched import measure_batches

    rows = measure_batches(nets["int8"], [1, 3], prompt_tokens=8, new_tokens=4)
    assert [(r["batch"], r["path"]) for r in rows] == [(1, "single"), (1, "batched"), (3, "batched")]
    assert all(r["decode_tok_s"] > 0 for r in rows)
    assert rows[2]["decode_tok_s"] == pytest.approx(3 * rows[2]["per_seq_tok_s"], rel=0.01)
    assert rows[2]["kv_blocks"] == 3 * rows[1]["kv_blocks"]


def test_layers_streamed_from_disk_batch_too():
    from hetero.runtime.engine import Engine
    from tests.runtime_engine.helpers import half, uniform_plan

    spec = hetero.spec("synthetic:tiny")
    with Engine.load(uniform_plan(spec, "int8", half(spec)), "synthetic:tiny") as eng:
        net = eng.model.net
        assert type(net.layers[-1]).__name__ == "StreamedUnit"
        prompts = _prompts((4, 30), seed=2)
        ref = [_alone(net, p, 8) for p in prompts]
        runner = BatchRunner(net, kv_bytes=1 << 20)
        ids = [runner.add(p, 8) for p in prompts]
        out = runner.run()
        assert [out[i] for i in ids] == ref


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_the_pool_is_resident_only_as_far_as_tokens_are_held(nets, kv_dtype):
    # a budget of many whole contexts costs no memory until written; then the pages follow the blocks
    # held at once (lowest ids first), however many sequences came and went
    net = nets["fp32"]
    pool = KVPool(net, n_blocks=512, block=16, kv_dtype=kv_dtype)
    assert pool.resident_bytes() <= 0.02 * pool.nbytes()
    runner = BatchRunner(net, pool=pool, max_batch=4)
    prompts = _prompts((20, 30, 12, 25, 8, 17), seed=5)
    ids = [runner.add(p, 6) for p in prompts]
    out, peak_blocks = {}, 0
    while not runner.idle:
        for ev in runner.step():
            out.setdefault(ev.request, []).append(ev.token)
        peak_blocks = max(peak_blocks, pool.used_blocks)
    assert len(out) == len(prompts)
    if kv_dtype == "auto":  # (int8 KV is not the single path's fp32 cache: its tokens may differ)
        assert [out[i] for i in ids] == [_alone(net, p, 6) for p in prompts]
    n_tensors = 2 * len(net.layers) * (2 if kv_dtype == "int8" else 1)
    written = pool.resident_bytes()
    # every block ever held was written (prompts fill them), and nothing past the peak's blocks
    assert written >= peak_blocks * pool.block_bytes * 0.5
    assert written <= peak_blocks * pool.block_bytes + n_tensors * 2 * 4096
    assert written < 0.1 * pool.nbytes()


def test_a_long_prompt_prefills_in_timed_chunks_between_the_running_streams_tokens(nets):
    # stall set: the chunk beside decoding streams is sized from timed steps; every step of the long
    # prompt's prefill still carries every running stream's decode row, and outputs are as alone
    net = nets["fp32"]
    short, long_ = _prompts((6, 9, 4), seed=7), _prompts((120,), seed=8)[0]
    runner = BatchRunner(net, kv_bytes=8 << 20, max_batch=8, prefill_tokens=100, stall=1.0)
    ids = [runner.add(p, 30) for p in short]
    out = _collect(runner, {}, steps=4)      # the streams decode, and the policy times their steps
    lid = runner.add(long_, 5)
    chunks = []
    while lid not in out:
        for ev in runner.step():
            out.setdefault(ev.request, []).append(ev.token)
        assert runner.last_decode_rows == len(short)  # no stream skipped a step for the prefill
        chunks.append(runner.last_prefill_tokens)
    assert sum(chunks) == len(long_) and len(chunks) > 1 and max(chunks) < 100
    if net.chunks_as_rows(runner.pool.kv):  # beside decode rows a chunk rides in the stack's step as rows
        assert max(chunks) <= ROWS_CHUNK
    _collect(runner, out)
    assert [out[i] for i in ids] == [_alone(net, p, 30) for p in short]
    assert out[lid] == _alone(net, long_, 5)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_without_compiled_kernels_batched_greedy_equals_alone(monkeypatch, precision):
    # A CPU without AVX-512 runs torch's kernels: each decode row still gets the bits it gets alone
    # (rows one by one through the linears, attention over exactly its own keys)
    from hetero.ops import kernels

    monkeypatch.setattr(kernels, "get", lambda: None)
    net = hetero.load("synthetic:tiny", dtype=precision).net
    assert net._decode_stack() is None
    prompts, n_new = _prompts(), [12, 7, 10, 15, 6, 11]
    ref = [_alone(net, p, n) for p, n in zip(prompts, n_new)]
    runner = BatchRunner(net, kv_bytes=4 << 20, max_batch=8)
    ids = [runner.add(p, n) for p, n in zip(prompts, n_new)]
    out, widest = _collect_widest(runner)
    assert widest == len(prompts) and [out[i] for i in ids] == ref


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_chunks_as_rows_give_the_chunk_path_logits(nets, precision):
    # A prefill chunk taken as rows of the compiled step (chunks_as_rows) must see exactly its
    # causal keys: its logits, and the decode rows' beside it, agree with the layer-by-layer chunk path
    from hetero.model.paged import Ragged, Segment

    net = nets[precision]
    pool = KVPool(net, 4 << 20)
    if not net.chunks_as_rows(pool.kv):
        pytest.skip("no compiled stack on this CPU (chunks_as_rows needs it)")
    dec, chunk = _prompts((9, 7, 12), seed=3), _prompts((20,), seed=4)[0]
    logits = {}
    for rows in (False, True):
        # the same KV state both times: decode sequences prefilled, the long prompt's first 8 tokens in
        blocks = [pool.allocate(100 * rows + i, 64) for i in range(4)]
        for b, first in zip(blocks, [p[:-1] for p in dec] + [chunk[:8]]):
            net.forward_ragged(torch.tensor(first), Ragged([Segment(0, len(first), b)], pool.block), pool.kv)
        segs = [Segment(len(p) - 1, 1, b) for p, b in zip(dec, blocks)] + [Segment(8, 12, blocks[3])]
        ids = [p[-1] for p in dec] + chunk[8:]
        logits[rows] = net.forward_ragged(torch.tensor(ids), Ragged(segs, pool.block), pool.kv, chunks_as_rows=rows)
        for i in range(4):
            pool.free(100 * rows + i)
    tol = 1e-4 if precision == "fp32" else 2e-2
    assert logits[True].shape == logits[False].shape == (4, net.spec.vocab_size)
    assert torch.allclose(logits[True], logits[False], atol=tol * logits[False].abs().max().item(), rtol=0)
    # and the decode rows keep their bits whichever way the chunk beside them runs
    assert torch.equal(logits[True][:3], logits[False][:3])
