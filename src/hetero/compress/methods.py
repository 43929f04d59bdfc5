"""Compression methods as a config plus a registered handler (the record goes into the artifact).

A handler takes the loaded model and its options and returns (new canonical tensors, record). The
record says what was done — method, options, which matrices, logical bytes — and is written into
the artifact's config.json, never into a file name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hetero.compress.core import Loaded, fp32_bytes, linear_names, model_bytes
from hetero.errors import HeteroError


@dataclass
class Options:
    group: int = 64               # int4 / gptq group size along the input dim
    sym: bool = False             # symmetric int4 grid (scale only)
    sparsity: float = 0.5         # unstructured pruning share
    nm: str | None = None         # "2:4" for N:M pruning (overrides sparsity)
    values: int = 16              # k-means codebook size per row
    calib_tokens: int = 2048      # calibration tokens (second half of the built-in corpus)
    calib_text: str | None = None
    act_order: bool = True        # GPTQ visits columns by decreasing input energy
    layers: int | None = None     # distill: student depth
    steps: int = 200              # distill: optimiser steps
    checkpoint_dir: str | None = None  # distill: where resumable checkpoints go
    progress: bool = True
    zero_point: bool = False     # int4 asym: integer zero points (compressed-tensors) instead of a free min (GGUF)
    head: bool = True             # quantise the head too (a tied head is the embedding)
    awq_grid: str = "rtn"         # awq: the grid after scaling (rtn | gptq)
    awq_alphas: int = 20          # awq: grid points of alpha in [0, 1)


Handler = Callable[[Loaded, Options], tuple[dict[str, torch.Tensor], dict]]
METHODS: dict[str, Handler] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str):
    def deco(fn: Handler) -> Handler:
        METHODS[name], DESCRIPTIONS[name] = fn, description
        return fn
    return deco


def known() -> str:
    return ", ".join(sorted(METHODS))


def apply(name: str, loaded: Loaded, opts: Options) -> tuple[dict[str, torch.Tensor], dict]:
    """Run method `name`; the record gains the method name, options and byte counts."""
    _load_all()
    if name not in METHODS:
        raise HeteroError(f"unknown method {name!r}; known: {known()}")
    tensors, record = METHODS[name](loaded, opts)
    record = {"method": name, **record, "baseline_fp32_bytes": fp32_bytes(loaded.spec),
              "source": loaded.model}
    if loaded.record:  # compressing an artifact again keeps its history
        record["previous"] = loaded.record
    return tensors, record


def _load_all() -> None:
    # Handlers live beside their algorithms; importing registers them.
    import importlib

    for mod in ("prune", "share", "distill", "awq"):
        try:
            importlib.import_module(f"hetero.compress.{mod}")
        except ModuleNotFoundError as e:  # a method family not built yet
            if e.name != f"hetero.compress.{mod}":
                raise


def calibration(loaded: Loaded, opts: Options, include_head: bool = True):
    from hetero.compress.calib import collect
    from hetero.eval.corpus import calib_ids

    ids = calib_ids(loaded.tokenizer, opts.calib_tokens, opts.calib_text)
    return collect(loaded, ids, progress=opts.progress, include_head=include_head)


def _check_group(opts: Options) -> None:
    if opts.group < 2:
        raise HeteroError(f"--group must be at least 2 (got {opts.group})")


def _quantized(loaded: Loaded, fn: Callable[[str, torch.Tensor], torch.Tensor], desc: str,
               tensors: dict[str, torch.Tensor] | None = None, include_head: bool = True) -> dict[str, torch.Tensor]:
    """Each linear weight through `fn`; a Grid result is kept in out["_grids"] and its values stored."""
    from hetero.compress.core import one_thread
    from hetero.compress.grid import Grid
    from hetero.progress import progress_bar

    src = tensors if tensors is not None else loaded.tensors
    out, grids = dict(src), {}
    names = linear_names(loaded.spec, include_head=include_head)
    with progress_bar(desc, len(names)) as advance, one_thread():
        for n in names:
            r = fn(n, src[n])
            if isinstance(r, Grid):
                grids[n], r = r, r.dequantize()
            out[n] = r
            advance()
    if grids:
        out["_grids"] = grids
    return out


def _grid_record(out: dict, record: dict) -> tuple[dict, dict]:
    """Move the grids from the tensors into the record (as `_grids`, popped by the writer)."""
    if "_grids" in out:
        record["_grids"] = out.pop("_grids")
    return out, record


def int4_record(loaded: Loaded, opts: Options, **extra) -> dict:
    """The record fields every int4 grid method shares (format, grid, which matrices, logical bytes)."""
    from hetero.compress.quant import int4_bytes

    names = linear_names(loaded.spec, include_head=opts.head)
    kind = "sym" if opts.sym else ("asym-zp" if opts.zero_point else "asym")
    head = "incl. head" if opts.head else "except the head (kept as stored)"
    return {"format": f"int4-g{opts.group}-{kind}", "group": opts.group, "sym": opts.sym,
            "zero_point": opts.zero_point and not opts.sym, **extra, "matrices": f"all linear {head}",
            "bytes": model_bytes(loaded.spec, lambda n, s: int4_bytes(s, opts.group, opts.sym), names)}


@register("int8", "int8 per output channel, round to nearest")
def _int8(loaded: Loaded, opts: Options):
    from hetero.compress.quant import int8_bytes, int8_rtn

    names = linear_names(loaded.spec)
    out = _quantized(loaded, lambda n, w: int8_rtn(w), "int8")
    return out, {"format": "int8-per-channel", "matrices": "all linear incl. head",
                 "bytes": model_bytes(loaded.spec, lambda n, s: int8_bytes(s), names)}


@register("int4", "int4 group-wise round to nearest (--group, --sym); same as rtn")
def _int4(loaded: Loaded, opts: Options):
    from hetero.compress.quant import int4_rtn_grid

    _check_group(opts)
    out = _quantized(loaded, lambda n, w: int4_rtn_grid(w, opts.group, opts.sym, opts.zero_point), "int4",
                     include_head=opts.head)
    return _grid_record(out, int4_record(loaded, opts))


register("rtn", "int4 group-wise round to nearest (--group, --sym)")(_int4)


@register("gptq", "int4 group-wise with GPTQ error compensation (--group, --sym, --calib-tokens)")
def _gptq(loaded: Loaded, opts: Options):
    from hetero.compress.quant import gptq_grid

    _check_group(opts)
    grams = calibration(loaded, opts, include_head=opts.head)
    out = _quantized(loaded, lambda n, w: gptq_grid(w, grams[n].hessian(), opts.group, opts.sym,
                                                    act_order=opts.act_order, zp=opts.zero_point), "gptq",
                     include_head=opts.head)
    return _grid_record(out, int4_record(loaded, opts, act_order=opts.act_order, calib_tokens=opts.calib_tokens))
