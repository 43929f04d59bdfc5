"""The plan a fine-tune runs: the base's placement and precision within the budget left after the
training step's own memory, and whether to keep activations or recompute them (checkpointing).

Keeping every layer's graph is faster (no recompute) but holds n_layers × the per-layer
activations; it is chosen only when the plan it allows keeps every unit resident. Otherwise the
step checkpoints per layer, which is also what lets streamed units be read once for forward and once
for backward.
"""
from __future__ import annotations

from hetero.errors import HeteroError
from hetero.hardware.profile import with_eager_rate
from hetero.plan.train import TrainWorkload, step_time, train_memory


def plan_training(model: str | None, spec, wl: TrainWorkload, memory: str | None, precisions: list[str] | None,
                  checkpoint: bool | None = None) -> tuple[object, bool, dict, list[str]]:
    """(plan, checkpoint, prediction, notes): prediction has memory by kind and step time."""
    from hetero.runtime.engine import _machine, plan_for_run

    tokens = wl.batch * wl.seq_len
    choices = [checkpoint] if checkpoint is not None else [False, True]
    last_err = None
    for ckpt in choices:
        quantised = precisions is None or any(p not in ("fp32", "bf16", "fp16") for p in precisions)
        mem = train_memory(spec, wl, ckpt, quantised)
        try:
            plan, notes = plan_for_run(model, None, memory, objective="decode", precisions=precisions,
                                       prompt_tokens=min(tokens, spec.max_context),
                                       context=min(wl.seq_len, spec.max_context), extra_reserve={"cpu": sum(mem.values())})
        except HeteroError as e:
            last_err = e
            continue
        if not ckpt and checkpoint is None and any(u.residency != "resident" for u in plan.units):
            continue  # streaming: the checkpointed step reads each unit once per pass
        hw, prof = _machine(None)
        pred = step_time(spec, plan, hw, with_eager_rate(prof), wl, ckpt)
        pred["memory"] = mem
        if not ckpt:
            notes.append("activations kept for backward (the budget holds them; no recompute)")
        return plan, ckpt, pred, notes
    raise last_err or HeteroError("no training plan fits the budget")
