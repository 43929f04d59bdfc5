"""Weight sharing: k-means codebooks (Deep Compression; SqueezeLLM's per-row codebooks).

Every output row of a matrix gets its own `values` shared values (centroids of 1-D k-means over the
row, initialised at quantiles); each weight stores only the index of its centroid. 16 values is
4 bits per weight, the same as int4 plus a bf16 codebook of 16 entries per row.
"""
from __future__ import annotations

import math

import torch

from hetero.compress.core import linear_names, model_bytes
from hetero.compress.methods import Options, register
from hetero.errors import HeteroError
from hetero.progress import progress_bar


def kmeans_rows(w: torch.Tensor, values: int = 16, iters: int = 15, chunk: int = 2048) -> torch.Tensor:
    """Each row of w [N, K] replaced by its nearest of `values` per-row centroids."""
    w = w.float()
    out = torch.empty_like(w)
    q = torch.linspace(0, 1, values)
    for a in range(0, w.shape[0], chunk):
        x = w[a:a + chunk]                                   # [r, K]
        c = torch.quantile(x, q, dim=1).T.contiguous()       # [r, values]
        for _ in range(iters):
            assign = (x[:, :, None] - c[:, None, :]).abs().argmin(dim=2)   # [r, K]
            sums = torch.zeros_like(c).scatter_add_(1, assign, x)
            counts = torch.zeros_like(c).scatter_add_(1, assign, torch.ones_like(x))
            c = torch.where(counts > 0, sums / counts.clamp(min=1), c)      # an empty cluster keeps its value
        assign = (x[:, :, None] - c[:, None, :]).abs().argmin(dim=2)
        out[a:a + chunk] = c.gather(1, assign)
    return out


def kmeans_bytes(shape: tuple[int, ...], values: int) -> int:
    n, k = shape[0], math.prod(shape[1:])
    return math.ceil(n * k * math.log2(values) / 8) + n * values * 2


@register("kmeans", "per-row k-means codebook with --values shared values (default 16 = 4 bits)")
def _kmeans(loaded, opts: Options):
    if not 2 <= opts.values <= 256:
        raise HeteroError(f"--values must be between 2 and 256 (got {opts.values})")
    names = linear_names(loaded.spec)
    out = dict(loaded.tensors)
    with progress_bar("kmeans", len(names), enabled=opts.progress) as advance:
        for n in names:
            out[n] = kmeans_rows(loaded.tensors[n], opts.values)
            advance()
    return out, {"values": opts.values, "codebook": "per output row", "matrices": "all linear incl. head",
                 "bytes": model_bytes(loaded.spec, lambda n, s: kmeans_bytes(s, opts.values), names)}
