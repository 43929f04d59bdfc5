"""Pruning masks (unstructured, N:M with a short tail, Wanda's activation weighting) and k-means."""
from __future__ import annotations

import pytest
import torch

from hetero.compress.methods import Options
from hetero.compress.prune import nm_mask, parse_nm, prune, unstructured_mask
from hetero.compress.quant import int4_rtn
from hetero.compress.share import kmeans_bytes, kmeans_rows
from hetero.errors import HeteroError


def _w(n=16, k=64, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_two_four_keeps_the_two_largest_of_every_four_and_handles_a_tail():
    s = _w(8, 66).abs()  # 66 = 16 groups of 4 + a tail of 2
    keep = nm_mask(s, 2, 4)
    groups = keep[:, :64].reshape(8, 16, 4)
    assert (groups.sum(2) == 2).all()
    kept_min = torch.where(groups, s[:, :64].reshape(8, 16, 4), torch.inf).amin(2)
    dropped_max = torch.where(~groups, s[:, :64].reshape(8, 16, 4), -torch.inf).amax(2)
    assert (kept_min >= dropped_max).all()
    assert (keep[:, 64:].sum(1) == 1).all()  # the tail keeps the same share, not skipped


def test_unstructured_per_row_and_per_matrix():
    s = _w().abs()
    per_row = unstructured_mask(s, 0.5, per_row=True)
    assert (per_row.sum(1) == 32).all()
    per_matrix = unstructured_mask(s, 0.25, per_row=False)
    assert int(per_matrix.sum()) == 16 * 64 - 256
    assert s[~per_matrix].max() <= s[per_matrix].min()


def test_wanda_keeps_weights_on_high_energy_inputs():
    w = _w(32, 64)
    norms = torch.ones(64)
    norms[:8] = 100.0  # inputs 0..7 carry almost all the activation energy
    opts = Options(sparsity=0.5)
    wanda = prune(w, w.abs() * norms, opts, per_row=True)
    magnitude = prune(w, w.abs(), opts, per_row=False)
    assert (wanda[:, :8] != 0).float().mean() > 0.95
    assert (magnitude[:, :8] == 0).any()
    x = torch.randn(256, 64) * norms
    err = lambda q: float(((x @ (w - q).T) ** 2).mean())  # noqa: E731
    assert err(wanda) < err(magnitude)


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "a:b"])
def test_bad_nm_pattern(bad):
    with pytest.raises(HeteroError):
        parse_nm(bad)


def test_kmeans_has_at_most_k_values_per_row_and_beats_a_uniform_grid():
    w = _w(32, 256)
    q = kmeans_rows(w, 16)
    assert all(q[r].unique().numel() <= 16 for r in range(32))
    # Same bits per weight as int4 with one grid per row: the fitted codebook errs less.
    assert float(((q - w) ** 2).mean()) < float(((int4_rtn(w, 256) - w) ** 2).mean())
    assert kmeans_bytes((32, 256), 16) == 32 * 256 // 2 + 32 * 16 * 2
