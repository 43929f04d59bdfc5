"""Per-unit sensitivity: the quality cost of running one unit at a lower precision, all else fp32.

For each planner unit (`embed`, `layers.i`, `head`) and precision, the model is built with only that
unit at that precision — through the runtime's own kernels, so the table prices exactly what a plan
would run — and scored against the fp32 model on the same calibration windows. The cost written for
the planner is the mean KL(fp32 ‖ variant) per token: the expected increase of log-perplexity on the
model's own distribution, ≈ the relative perplexity increase for small losses, always ≥ 0, and far
less noisy on a few hundred tokens than a perplexity difference. The measured relative perplexity
change is kept beside it. Output: the JSON that hetero.plan.sensitivity.load_sensitivity reads,
{"units": {unit: {precision: cost}}, ...}.
"""
from __future__ import annotations

import datetime
import time

from hetero.compress.core import Loaded, build_net
from hetero.eval.perplexity import perplexity
from hetero.model.units import UnitConfig
from hetero.progress import progress_bar

PRECISIONS = ("bf16", "int8", "int4")


def measure(loaded: Loaded, ids: list[int], precisions=("int8", "int4"), context: int = 512,
            units: list[str] | None = None, progress: bool = True) -> dict:
    """The sensitivity table of `loaded` on calibration `ids` (see module doc)."""
    spec = loaded.spec
    units = units or spec.unit_names()
    ref: list = []
    t0 = time.perf_counter()
    base = perplexity(build_net(spec, loaded.tensors), ids, context, context, progress=False, keep=ref)
    table: dict[str, dict[str, float]] = {}
    dppl: dict[str, dict[str, float]] = {}
    with progress_bar("sensitivity", len(units) * len(precisions), enabled=progress) as advance:
        for u in units:
            for p in precisions:
                net = build_net(spec, loaded.tensors, {u: UnitConfig("cpu", p)})
                r = perplexity(net, ids, context, context, progress=False, reference=ref)
                table.setdefault(u, {})[p] = max(r.kl, 0.0)
                dppl.setdefault(u, {})[p] = r.perplexity / base.perplexity - 1.0
                advance()
    return {
        "units": table,
        "relative_ppl_change": dppl,
        "meta": {"model": loaded.model, "fingerprint": spec.fingerprint(), "cost": "mean KL(fp32||unit at p), nats/token",
                 "baseline": "fp32 from the source's own weights", "baseline_perplexity": base.perplexity,
                 "tokens": base.tokens, "context": context, "corpus": "pydoc_data.topics, second half",
                 "seconds": round(time.perf_counter() - t0, 1),
                 "date": datetime.date.today().isoformat()},
    }


def builtin_table(model: str) -> str | None:
    """Path of the measured table shipped for a built-in model (e.g. `smollm2-135m`), or None."""
    from pathlib import Path

    p = Path(__file__).parent / "tables" / f"{model}.json"
    return str(p) if p.exists() else None
