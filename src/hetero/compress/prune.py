"""Pruning: zero the least important weights of every decoder projection (the embedding and head
stay dense, as in the Wanda paper).

- magnitude (Han et al. 2015): importance |W|, compared across the whole matrix.
- Wanda (Sun et al. 2023): importance |W_ij| · ‖X_j‖ (input-activation norm over calibration
  tokens), compared within each output row; no weight update.
- N:M (e.g. 2:4): keep the N most important of every M consecutive input weights; a tail shorter
  than M keeps the same share (rounded up), so no column is skipped. 2:4 sparse kernels exist on
  recent CUDA GPUs; here the mask is applied to dense weights.
"""
from __future__ import annotations

import math

import torch

from hetero.compress.core import linear_names
from hetero.compress.methods import Options, calibration, register
from hetero.errors import HeteroError


def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise HeteroError(f"--nm must look like 2:4 (got {text!r})") from None
    if not 0 < n < m:
        raise HeteroError(f"--nm {text}: need 0 < N < M")
    return n, m


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask [R, K]: the n highest scores of every m consecutive columns in each row."""
    r, k = score.shape
    keep = torch.zeros_like(score, dtype=torch.bool)
    main = k - k % m
    if main:
        s = score[:, :main].reshape(r, main // m, m)
        idx = s.topk(n, dim=2).indices
        keep[:, :main] = torch.zeros_like(s, dtype=torch.bool).scatter_(2, idx, True).reshape(r, main)
    if main < k:
        tail = score[:, main:]
        idx = tail.topk(math.ceil((k - main) * n / m), dim=1).indices
        keep[:, main:] = torch.zeros_like(tail, dtype=torch.bool).scatter_(1, idx, True)
    return keep


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep mask with `sparsity` of the entries (lowest scores) removed, per row or per matrix."""
    if per_row:
        drop = int(score.shape[1] * sparsity)
        if drop == 0:
            return torch.ones_like(score, dtype=torch.bool)
        idx = score.topk(drop, dim=1, largest=False).indices
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, idx, False)
    drop = int(score.numel() * sparsity)
    if drop == 0:
        return torch.ones_like(score, dtype=torch.bool)
    flat = score.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[flat.topk(drop, largest=False).indices] = False
    return keep.reshape(score.shape)


def prune(w: torch.Tensor, score: torch.Tensor, opts: Options, per_row: bool) -> torch.Tensor:
    if opts.nm:
        keep = nm_mask(score, *parse_nm(opts.nm))
    else:
        keep = unstructured_mask(score, opts.sparsity, per_row)
    return w * keep


def sparse_bytes(tensors: dict[str, torch.Tensor], spec, names: list[str]) -> int:
    """Kept values at fp32 plus a one-bit-per-weight mask for pruned matrices; the rest dense fp32."""
    chosen = set(names)
    total = 0
    for n, t in tensors.items():
        if spec.tie_embeddings and n == "lm_head.weight":
            continue
        total += int(t.count_nonzero()) * 4 + math.ceil(t.numel() / 8) if n in chosen else t.numel() * 4
    return total


def _check(opts: Options) -> None:
    if opts.nm:
        parse_nm(opts.nm)
    elif not 0.0 <= opts.sparsity < 1.0:
        raise HeteroError(f"--sparsity must be in [0, 1) (got {opts.sparsity})")


def _record(kind: str, opts: Options, out, loaded, names) -> dict:
    return {"pattern": opts.nm or f"unstructured {opts.sparsity:g}", "scope": kind,
            "matrices": "decoder projections (embedding and head dense)",
            "bytes": sparse_bytes(out, loaded.spec, names)}


@register("magnitude", "prune by |W| (--sparsity, or --nm 2:4)")
def _magnitude(loaded, opts: Options):
    _check(opts)
    names = linear_names(loaded.spec, include_head=False)
    out = dict(loaded.tensors)
    for n in names:
        w = loaded.tensors[n]
        out[n] = prune(w, w.abs(), opts, per_row=False)
    return out, _record("per matrix", opts, out, loaded, names)


@register("wanda", "prune by |W|·‖X‖ per output row (--sparsity, or --nm 2:4; --calib-tokens)")
def _wanda(loaded, opts: Options):
    _check(opts)
    grams = calibration(loaded, opts, include_head=False)
    names = linear_names(loaded.spec, include_head=False)
    out = dict(loaded.tensors)
    for n in names:
        w = loaded.tensors[n]
        out[n] = prune(w, w.abs() * grams[n].col_norms()[None, :], opts, per_row=True)
    rec = _record("per output row", opts, out, loaded, names)
    rec["calib_tokens"] = opts.calib_tokens
    return out, rec


@register("nm", "N:M structured sparsity by the Wanda score (--nm, default 2:4)")
def _nm(loaded, opts: Options):
    if not opts.nm:
        opts.nm = "2:4"
    return _wanda(loaded, opts)
