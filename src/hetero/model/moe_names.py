"""MoE tensor names: an HF checkpoint's per-expert tensors <-> hetero's canonical stacked ones.

HF checkpoints store each routed expert as its own matrices (Mixtral `block_sparse_moe.experts.J.w1`,
Qwen `mlp.experts.J.gate_proj`); GGUF stores a layer's experts as one [E, ...] tensor. hetero's
canonical form is GGUF's, under Qwen's names (`mlp.experts.gate_proj.weight` [E, f, h], router
`mlp.gate.weight` [E, h]), so the spec sees one tensor per projection and the executor one stack.
No torch here: the spec is built from headers alone.
"""
from __future__ import annotations

import re

from hetero.model.spec import TensorInfo

# Mixtral's w1/w3/w2 are the gate/up/down projections
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_HF_EXPERT = re.compile(r"^(model\.layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_MIXTRAL_ROUTER = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\.gate\.weight$")


def canonical(hf_name: str) -> tuple[str, int | None]:
    """(canonical name, expert index or None) of an HF tensor name."""
    m = _HF_EXPERT.match(hf_name)
    if m:
        proj = _MIXTRAL_PROJ.get(m.group(3), m.group(3))
        return f"{m.group(1)}mlp.experts.{proj}.weight", int(m.group(2))
    m = _MIXTRAL_ROUTER.match(hf_name)
    if m:
        return f"{m.group(1)}mlp.gate.weight", None
    return hf_name, None


def fold(tensors: list[TensorInfo]) -> list[TensorInfo]:
    """An HF tensor table with each layer's per-expert matrices stacked into one canonical [E, ...]
    entry (its bytes the sum). Experts that are not 0..E-1 of one shape and type stay out, so the
    spec's check names the stacked tensor as missing."""
    out: list[TensorInfo] = []
    groups: dict[str, dict[int, TensorInfo]] = {}
    for t in tensors:
        name, j = canonical(t.name)
        if j is None:
            out.append(t if name == t.name else TensorInfo(name, t.shape, t.dtype, t.nbytes))
        else:
            groups.setdefault(name, {})[j] = t
    for name, parts in groups.items():
        first = parts[0] if 0 in parts else None
        if (first is None or sorted(parts) != list(range(len(parts)))
                or any((p.shape, p.dtype) != (first.shape, first.dtype) for p in parts.values())):
            continue
        out.append(TensorInfo(name, (len(parts), *first.shape), first.dtype, sum(p.nbytes for p in parts.values())))
    return out


def hf_parts(name: str, have: set[str] | dict, n_experts: int) -> list[str] | None:
    """The HF tensors that make canonical `name` (one per expert, in order), where `have` holds them."""
    m = re.match(r"^(model\.layers\.\d+\.)mlp\.(experts\.(\w+)|gate)\.weight$", name)
    if not m:
        return None
    p = m.group(1)
    if m.group(2) == "gate":
        alt = p + "block_sparse_moe.gate.weight"
        return [alt] if alt in have else None
    proj = m.group(3)
    mixtral = {v: k for k, v in _MIXTRAL_PROJ.items()}.get(proj)
    for names in ([f"{p}mlp.experts.{j}.{proj}.weight" for j in range(n_experts)],
                  [f"{p}block_sparse_moe.experts.{j}.{mixtral}.weight" for j in range(n_experts)] if mixtral else []):
        if names and all(n in have for n in names):
            return names
    return None
