"""The sampler draws from the distribution the parameters define: temperature, top-k and the top-p
nucleus (the smallest most-likely set reaching the mass, as a full sort gives it), seeded."""
from __future__ import annotations

import torch

from hetero.runtime.sampling import Sampler, SamplingParams, _nucleus


def reference_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The nucleus by sorting the whole vocabulary."""
    sp, order = torch.sort(probs, descending=True)
    drop = sp.cumsum(0) - sp >= top_p
    return set(order[~drop].tolist())


def test_nucleus_is_the_full_sorts_for_peaked_and_flat_distributions():
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 3.0, 8.0):  # flat (bucketed by value) to peaked (the top 64 hold it)
        for top_p in (0.05, 0.5, 0.9, 0.99):
            probs = torch.softmax(torch.randn(5000, generator=g) * scale, 0)
            p, ids = _nucleus(probs, None, top_p)
            assert set(ids.tolist()) == reference_nucleus(probs, top_p)
            assert torch.equal(p, probs[ids])
            if scale >= 8.0:   # the top 64 hold it: most likely first
                assert bool((p[:-1] >= p[1:]).all())


def test_draws_follow_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0, 0.5])
    n = 6000
    s = Sampler(SamplingParams(temperature=0.8, seed=3))
    counts = torch.bincount(torch.tensor([s(logits, []) for _ in range(n)]), minlength=6).double()
    want = torch.softmax(logits / 0.8, 0).double() * n
    assert counts[4] == 0  # probability ~1e-16
    assert float(((counts - want) ** 2 / want.clamp(min=1)).sum()) < 25  # chi-square, 5 dof: p ≈ 1e-4


def test_top_k_and_top_p_only_draw_inside_their_sets():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 2
    top5 = set(torch.topk(logits, 5).indices.tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_k=5, seed=1))
    draws = {s(logits, []) for _ in range(300)}
    assert draws <= top5 and len(draws) > 1
    nucleus = reference_nucleus(torch.softmax(logits, 0), 0.3)
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.3, seed=1))
    draws = {s(logits, []) for _ in range(300)}
    assert draws <= nucleus and len(draws) > 1


def test_a_seed_repeats_and_another_differs():
    logits = torch.randn(50000, generator=torch.Generator().manual_seed(2))
    for top_p in (1.0, 0.95):
        a, b, c = (Sampler(SamplingParams(temperature=1.0, top_p=top_p, seed=s)) for s in (7, 7, 8))
        da, db, dc = ([x(logits, []) for _ in range(10)] for x in (a, b, c))
        assert da == db and da != dc


def test_nucleus_of_a_flat_vocabulary_with_masked_tokens():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(32000, generator=g)
    logits[::3] = float("-inf")   # probability 0: never in the nucleus
    probs = torch.softmax(logits, 0)
    for top_p in (0.3, 0.95, 0.999999):
        p, ids = _nucleus(probs, None, top_p)
        assert set(ids.tolist()) == reference_nucleus(probs, top_p) - {i for i in range(0, 32000, 3)}
        assert bool((p > 0).all()) and torch.equal(p, probs[ids])
