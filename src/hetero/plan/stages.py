"""A pipeline Plan: the split's contiguous stages, each planned per unit (device, precision, residency)
within its own rank's budgets, joined into one Plan whose `stages` name the ranks.

Pure like the rest of the planner: the caller says which units each rank runs and what hardware and
budgets it has; nothing here probes a machine.
"""
from __future__ import annotations

from dataclasses import dataclass

from hetero.hardware.types import HardwareSpec, Profile
from hetero.model.spec import ModelSpec
from hetero.plan.make import make_plan
from hetero.plan.plan import Plan, Prediction, Stage, Why


@dataclass(frozen=True)
class StageRequest:
    """One rank's share: its contiguous units, the hardware it may use, its budgets and reserve."""
    rank: int
    host: str
    device: str                       # the rank's compute device
    units: tuple[str, ...]
    hardware: HardwareSpec
    profile: Profile | None
    memory: dict[str, int]            # the rank's budgets (unset memory devices: what the host has)
    reserve: dict[str, int]           # what the rank's own process holds before any weights
    send_s: float = 0.0               # its decode-step activations to the next rank
    prefill_send_s: float = 0.0


def pipeline_plan(spec: ModelSpec, requests: list[StageRequest], objective: str = "decode",
                  prompt_tokens: int = 512, context: int | None = None, batch: int = 1,
                  precisions: list[str] | None = None) -> Plan:
    """Plan every rank's units as make_plan plans one process, then join them in rank order.

    A tied embedding split from its head takes the head's precision: one matrix rounded one way, as in
    one process (so a pipeline and `hetero run` with the same choices give the same tokens).
    """
    reqs = sorted(requests, key=lambda r: r.rank)
    plans: dict[int, Plan] = {}
    pinned: dict[str, str] = {}
    for r in sorted(reqs, key=lambda r: "head" not in r.units):  # the head's stage first
        p = make_plan(spec, r.hardware, r.profile, memory=r.memory, objective=objective,
                      prompt_tokens=prompt_tokens, context=context, batch=batch, precisions=precisions,
                      reserve=r.reserve, explain=False, units=list(r.units), pinned=pinned)
        plans[r.rank] = p
        if spec.tie_embeddings and "head" in r.units and "embed" not in r.units:
            pinned = {"embed": p.unit("head").precision}
    stages = tuple(Stage(r.host, r.units[0], r.units[-1], r.rank, r.device, dict(plans[r.rank].budgets),
                         dict(plans[r.rank].reserve), dict(plans[r.rank].memory),
                         plans[r.rank].predicted.decode_ms, plans[r.rank].predicted.prefill_ms, r.send_s * 1e3)
                   for r in reqs)
    first = plans[reqs[0].rank]

    def total(field: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in reqs:
            for d, v in getattr(plans[r.rank], field).items():
                out[d] = out.get(d, 0) + v
        return out

    step = [plans[r.rank].predicted.decode_ms / 1e3 + r.send_s for r in reqs]
    pre_s = sum(plans[r.rank].predicted.prefill_ms / 1e3 + r.prefill_send_s for r in reqs)
    dec_s = sum(step)  # one step of every sequence (batch) through every stage in turn
    pred = Prediction(prefill_tok_s=batch * first.prompt_tokens / pre_s, decode_tok_s=batch / dec_s,
                      ttft_s=pre_s, decode_ms=dec_s * 1e3, prefill_ms=pre_s * 1e3,
                      throughput_tok_s=batch / dec_s,
                      quality_loss=sum(p.predicted.quality_loss for p in plans.values()))
    notes = tuple(f"rank {r.rank} ({r.host}, {r.device}): {r.units[0]}..{r.units[-1]}" for r in reqs)
    return Plan(model=spec.name, fingerprint=spec.fingerprint(), host=first.host, hardware=first.hardware,
                objective=objective, prompt_tokens=first.prompt_tokens, context=first.context, batch=batch,
                budgets=total("budgets"), units=tuple(u for r in reqs for u in plans[r.rank].units),
                memory=total("memory"), predicted=pred, reserve=total("reserve"),
                precisions=tuple(sorted({x for p in plans.values() for x in p.precisions})),
                prefetch=True, prefetch_depth=first.prefetch_depth, stages=stages,
                why=Why(notes=("a pipeline: each rank planned within its own budgets",) + notes),
                solver={"stages": [plans[r.rank].solver for r in reqs]})
