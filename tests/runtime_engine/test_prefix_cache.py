"""The KV pool's prefix cache (runtime/kvcache.py, runtime/batch.py): whole prompt blocks are kept
after their sequence leaves and shared by later prompts that start with the same tokens."""
from __future__ import annotations

import pytest
import torch

import hetero
from hetero.runtime.batch import BatchRunner
from hetero.runtime.kvcache import KVPool


@pytest.fixture(scope="module")
def net():
    return hetero.load("synthetic:tiny", dtype="fp32").net


def _ids(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(runner, prompt, n):
    rid = runner.add(prompt, n)
    return runner.run()[rid]


def test_a_prompt_that_starts_like_a_finished_one_shares_its_blocks_and_gets_the_same_tokens(net):
    head, tail = _ids(32, 1), _ids(9, 2)            # two whole blocks, then a tail of its own
    cached = BatchRunner(net, pool=KVPool(net, n_blocks=32, block=16, prefix_cache=True), prefill_tokens=32)
    _run(cached, head, 4)                            # prefills [0, 32) in one chunk, then leaves
    assert cached.pool.cached_blocks == 2 and cached.pool.used_blocks == 0
    steps0 = cached.steps
    got = _run(cached, head + tail, 10)
    assert cached.cached_tokens == 32                # the second prompt ran only its 9 tail tokens
    assert cached.steps - steps0 == 10               # its prefill was one step (the 9-token chunk)
    # the same chunks cold: [0, 32) and then the tail, in a pool without a cache
    cold = BatchRunner(net, pool=KVPool(net, n_blocks=32, block=16), prefill_tokens=32)
    assert got == _run(cold, head + tail, 10)
    assert cold.cached_tokens == 0 and cold.pool.cached_blocks == 0


def test_the_last_prompt_token_always_runs_and_running_sequences_share_too(net):
    p = _ids(48, 3)                                  # exactly three blocks
    runner = BatchRunner(net, pool=KVPool(net, n_blocks=32, block=16, prefix_cache=True))
    _run(runner, p, 5)
    assert runner.pool.cached_blocks == 3
    # the same prompt again: two blocks from the cache, the third block's 16 tokens run (the last
    # one is sampled from), so it is not taken whole
    again = _run(runner, p, 5)
    assert runner.cached_tokens == 32 and len(again) == 5
    # two at once while a third holds the blocks: every block is held, and all of it goes back
    a, b = runner.add(p + _ids(3, 4), 6), runner.add(p + _ids(5, 5), 6)
    out = {}
    for ev in runner.step():
        out.setdefault(ev.request, []).append(ev.token)
    held = runner.pool.used_blocks
    assert held < 2 * runner.pool.blocks_for(48 + 5 + 6)   # the shared prefix counted once
    for rid, toks in runner.run().items():
        out.setdefault(rid, []).extend(toks)
    assert len(out[a]) == 6 and len(out[b]) == 6
    assert runner.pool.used_blocks == 0 and runner.pool.free_blocks == runner.pool.n_blocks


def test_cached_blocks_are_evicted_least_recent_first_when_a_sequence_needs_them(net):
    pool = KVPool(net, n_blocks=6, block=16, prefix_cache=True)
    runner = BatchRunner(net, pool=pool)
    a, b = _ids(32, 10), _ids(32, 11)
    _run(runner, a, 2)                                 # 2 blocks for a's prompt (+1 for its tokens)
    _run(runner, b, 2)
    assert pool.cached_blocks == 4 and pool.free_blocks == 6   # idle cached blocks count as free
    _run(runner, _ids(80, 12), 4)                      # needs 6 blocks: every cached one is evicted
    assert pool.cached_blocks == 5                     # ... and the new prompt's own 5 whole blocks cached
    _run(runner, a + _ids(4, 13), 2)
    assert runner.cached_tokens == 0                   # a's blocks were gone


def test_without_the_cache_nothing_is_kept(net):
    runner = BatchRunner(net, pool=KVPool(net, n_blocks=16, block=16))
    p = _ids(40, 20)
    _run(runner, p, 3)
    _run(runner, p, 3)
    assert runner.cached_tokens == 0 and runner.pool.cached_blocks == 0
