"""Chunked prefill sized from timed steps (runtime/chunking.py): a chunk costs about `stall` decode
steps, whatever a chunk's fixed cost and per-token cost are, within [least, most]."""
from __future__ import annotations

import pytest

from hetero.runtime.chunking import ChunkPolicy


def _settle(policy, t_decode, fixed, per_token, n_decode=7, steps=40):
    for _ in range(3):
        policy.observe(n_decode, 0, t_decode)
    sizes = []
    for _ in range(steps):
        p = policy.tokens(n_decode)
        sizes.append(p)
        policy.observe(n_decode, p, t_decode + fixed + per_token * p)
    return sizes


@pytest.mark.parametrize("fixed,per_token", [(0.0, 0.001), (0.004, 0.0005), (0.008, 0.0002)])
def test_the_chunk_settles_where_it_costs_stall_decode_steps(fixed, per_token):
    t_decode = 0.015
    for stall in (1.0, 1.5):
        sizes = _settle(ChunkPolicy(most=512, least=4, stall=stall), t_decode, fixed, per_token)
        want = (stall * t_decode - fixed) / per_token
        assert sizes[0] == 4  # nothing measured for prefill yet: the small one
        assert abs(sizes[-1] - want) <= 0.05 * want + 1, (sizes[-5:], want)
        assert all(fixed + per_token * p <= 1.5 * stall * t_decode for p in sizes[5:])


def test_bounds_and_no_decode():
    policy = ChunkPolicy(most=64, least=8)
    assert policy.tokens(0) == 64           # nothing decoding: nobody waits on the step
    assert _settle(policy, 0.010, 0.0, 1e-6)[-1] == 64       # cheap tokens: capped at most
    assert _settle(ChunkPolicy(most=64, least=8), 0.010, 0.050, 0.001)[-1] == 8  # never under least
    with pytest.raises(ValueError):
        ChunkPolicy(most=0)
