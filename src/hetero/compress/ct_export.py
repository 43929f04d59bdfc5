"""A quantiser's grids as an HF dir in the compressed-tensors `pack-quantized` layout, the format
vLLM and transformers (with the compressed-tensors package) load for int4 GPTQ/AWQ checkpoints.

Each quantised linear stores weight_packed / weight_scale / weight_shape (and weight_zero_point
when asymmetric: compressed-tensors' asym grid has an integer zero point, so the methods quantise
with `zero_point=True` for this format). Scales are fp16 values stored as fp32, so the loaders'
(x_q - zp) * scale, done in the scale's dtype, gives the grid's values exactly. Everything else
(norms fp32; an unquantised embedding bf16) is stored dense. hetero.model.ct reads it back.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hetero.errors import HeteroError
from hetero.model.ct import pack4
from hetero.model.spec import ModelSpec, expected_tensors

DENSE_DTYPE = torch.bfloat16  # matrices without a grid (the tied embedding)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to(DENSE_DTYPE) if t.dim() == 2 else t.float()


def stored_values(spec: ModelSpec, tensors: dict, grids: dict) -> dict:
    """`tensors` as the dir holds them (grid matrices as they are, other matrices through bf16)."""
    return {n: (tensors[n] if n in grids else _dense(tensors[n]).float()) for n, _ in expected_tensors(spec)}


def quantization_config(grids: dict, ignore: list[str]) -> dict:
    g = next(iter(grids.values()))
    if any(x.group != g.group or x.sym != g.sym for x in grids.values()):
        raise HeteroError("compressed-tensors export needs one group size and symmetry for every matrix")
    weights = {"num_bits": 4, "type": "int", "symmetric": g.sym, "strategy": "group", "group_size": g.group,
               "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ignore, "kv_cache_scheme": None}


def pack(grid) -> dict[str, torch.Tensor]:
    """One Grid as its compressed-tensors parts (names without the module prefix)."""
    n, k = grid.shape
    if grid.bits != 4 or k % 8 or k % grid.group or (not grid.sym and not grid.zp) or (grid.zp and n % 8):
        raise HeteroError(f"a [{n}, {k}] int4 grid (group {grid.group}) does not map onto pack-quantized "
                          "(K a multiple of 8 and of the group; asymmetric grids need integer zero points)")
    parts = {"weight_packed": pack4(grid.codes), "weight_scale": grid.scale.float().contiguous(),
             "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if grid.zp:  # stored zero point zp + 8 = z, packed along N
        parts["weight_zero_point"] = pack4(grid.lo.to(torch.uint8).T.contiguous()).T.contiguous()
    return parts


def write_ct_dir(out: str | Path, spec: ModelSpec, tensors: dict, grids: dict, record: dict | None,
                 tokenizer=None, force: bool = False) -> dict:
    """Write the pack-quantized dir; returns the record with `bytes` = the weights file's bytes."""
    from safetensors.torch import save_file

    from hetero.compress.artifact import hf_config, staged_output

    if not grids:
        raise HeteroError("compressed-tensors export needs a quantiser's grids (--method rtn, gptq or awq)")
    data: dict[str, torch.Tensor] = {}
    for name, _ in expected_tensors(spec):
        if name in grids:
            prefix = name[:-len("weight")]
            data.update({prefix + k: v for k, v in pack(grids[name]).items()})
        else:
            data[name] = _dense(tensors[name]).contiguous()
    ignore = [] if "lm_head.weight" in grids else ["lm_head"]
    record = dict(record or {})
    with staged_output(out, force) as tmp:
        save_file(data, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        record.update({"format": f"compressed-tensors-pack-quantized-{record.get('format', 'int4')}",
                       "bytes": (tmp / "model.safetensors").stat().st_size})
        cfg = hf_config(spec, record, "bf16", tokenizer)
        cfg["quantization_config"] = quantization_config(grids, ignore)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        hf = getattr(tokenizer, "hf", None)
        if hf is not None:
            hf.save_pretrained(str(tmp))
    return record
