"""Quality cost of holding a unit at a precision: the default table, and loading a measured one.

The unit of cost is the relative perplexity increase (0.01 = +1%) that the unit at that precision adds,
summed over units. `--max-quality-loss X` bounds that sum. The compression work measures a real
table per model; until a table is given this documented default stands in for it:

- whole-model figures for weight-only quantisation of Llama-family models, as commonly reported:
  int8 per-channel ~ +0.2% perplexity, int4 group-wise (group 32) ~ +3%; fp32/bf16/fp16 ~ 0;
- spread over units by their share of the matmul parameters, with the units known to be more
  sensitive weighted up: the head x2, the first and last decoder layers x1.5; the embedding (a
  lookup, its errors do not compound through a matmul) x0.25. Weights are normalised so that the
  whole model at precision p costs exactly BASE[p].
"""
from __future__ import annotations

import json
from pathlib import Path

from hetero.errors import HeteroError
from hetero.model.spec import ModelSpec

BASE: dict[str, float] = {"fp32": 0.0, "bf16": 0.0, "fp16": 0.0, "int8": 0.002, "int4": 0.03,
                          # GGUF block formats, as llama.cpp's quantize tool reports them for a 7B
                          # Llama (perplexity over fp16): Q8_0 ~0, Q6_K +0.1%, Q5_K_M +0.6%,
                          # Q4_K_M +0.9%, Q4_1 +3%, Q4_0 +4%
                          "q8_0": 0.0005, "q6_k": 0.001, "q5_k": 0.006, "q4_k": 0.012, "q4_1": 0.03,
                          "q4_0": 0.04,
                          # the file as it is stored: the reference a GGUF model's quality is measured by
                          "native": 0.0}
ROLE: dict[str, float] = {"embed": 0.25, "head": 2.0, "edge_layer": 1.5, "layer": 1.0}

# A measured table: (unit, precision) -> cost. Pairs it lacks fall back to the default.
Sensitivity = dict[tuple[str, str], float]

# What `hetero run`, `serve` and `bench` keep quality within when no bound is given: +1% perplexity
# (summed unit costs), so a sensitive unit (a tied head) stays wider when a narrow format costs too much.
DEFAULT_MAX_QUALITY_LOSS = 0.01
SHIPPED = Path(__file__).resolve().parent.parent / "compress" / "tables"


def shipped_sensitivity(spec: ModelSpec) -> Sensitivity | None:
    """The measured table shipped for this model (built-in models), when it was measured on these very
    shapes (its fingerprint); None otherwise."""
    p = SHIPPED / f"{spec.name}.json"
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if d.get("meta", {}).get("fingerprint") not in (None, spec.fingerprint()):
        return None
    return sensitivity_from_dict(d)


def unit_weights(spec: ModelSpec) -> dict[str, float]:
    """Each unit's share of the model's sensitivity (sums to 1)."""
    n = spec.n_layers
    raw: dict[str, float] = {}
    for u in spec.unit_names():
        if u == "embed":
            params, role = spec.vocab_size * spec.hidden_size, ROLE["embed"]
        elif u == "head":
            params, role = spec.vocab_size * spec.hidden_size, ROLE["head"]
        else:
            i = int(u.split(".")[1])
            # a MoE layer's two units: what one token multiplies by in each
            params = spec.routed_matmul_params() if spec.is_experts_unit(u) else spec.dense_matmul_params()
            role = ROLE["edge_layer"] if i in (0, n - 1) else ROLE["layer"]
        raw[u] = params * role
    total = sum(raw.values()) or 1.0
    return {u: v / total for u, v in raw.items()}


def quality_table(spec: ModelSpec, precisions, table: Sensitivity | None = None) -> Sensitivity:
    """(unit, precision) -> cost for every unit of `spec`: `table` where it has the pair, else the default."""
    w = unit_weights(spec)
    out: Sensitivity = {}
    for u in spec.unit_names():
        for p in precisions:
            if table is not None and (u, p) in table:
                out[(u, p)] = float(table[(u, p)])
            else:
                out[(u, p)] = BASE.get(p, 0.0) * w[u]
    return out


def load_sensitivity(path: str | Path) -> Sensitivity:
    """A table from JSON: {"layers.0": {"int4": 0.004, "int8": 0.0002}, "head": {...}, ...}
    (optionally wrapped as {"units": {...}}). Costs are relative perplexity increases."""
    from hetero.paths import read_user_text

    try:
        d = json.loads(read_user_text(path, "sensitivity table"))
    except (OSError, ValueError, RecursionError) as e:
        raise HeteroError(f"cannot read sensitivity table {path}: {e}") from None
    return sensitivity_from_dict(d)


def sensitivity_from_dict(d: dict) -> Sensitivity:
    d = d.get("units", d) if isinstance(d, dict) else d
    if not isinstance(d, dict):
        raise HeteroError("a sensitivity table maps unit -> {precision: cost}")
    out: Sensitivity = {}
    for unit, row in d.items():
        if not isinstance(row, dict):
            raise HeteroError(f"sensitivity table: {unit!r} must map precision -> cost")
        for p, c in row.items():
            if not isinstance(c, (int, float)) or c < 0:
                raise HeteroError(f"sensitivity table: {unit}/{p} must be a non-negative number")
            out[(unit, p)] = float(c)
    return out


def sensitivity_to_dict(table: Sensitivity) -> dict:
    out: dict[str, dict[str, float]] = {}
    for (u, p), c in table.items():
        out.setdefault(u, {})[p] = c
    return {"units": out}
