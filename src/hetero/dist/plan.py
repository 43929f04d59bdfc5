"""The pipeline's Plan: the split fixes each rank's contiguous units; the planner then chooses every
unit's device, precision and residency within that rank's budgets, with `hetero run`'s defaults.
"""
from __future__ import annotations

import dataclasses
import os

from hetero.dist.split import RankSpeed, Split
from hetero.errors import HeteroError
from hetero.model.spec import ModelSpec
from hetero.plan.plan import Plan

# The split balances stages with one precision's costs: the one the planner would pick for decode
# when memory allows (fewest bytes per token), among those the ranks may use.
SPLIT_PREFERENCE = ("int4", "int8", "bf16", "fp16", "fp32")


def split_precision(speeds: list[RankSpeed], precisions: list[str] | None) -> str:
    for p in SPLIT_PREFERENCE:
        if (precisions is None or p in precisions) and all(p in s.rates.precisions for s in speeds):
            return p
    have = sorted(set.intersection(*(set(s.rates.precisions) for s in speeds)))
    raise HeteroError(f"no precision among {', '.join(precisions or SPLIT_PREFERENCE)} runs on every rank "
                      f"(every rank has: {', '.join(have) or 'none'})")


def this_machine():
    """This machine as `hetero run` plans for it: its runnable devices and its cached profile. A rank
    runs fewer threads than the profile was measured with; it reads that profile all the same rather
    than re-measure (and overwrite) it from every rank: the split divides rates among the ranks."""
    import json
    import warnings

    from hetero.hardware.inventory import host_name, inventory
    from hetero.hardware.profile import PROFILE_VERSION, profile_path
    from hetero.hardware.types import Profile
    from hetero.runtime import devices

    prof = None
    try:
        d = json.loads(profile_path(host_name(), os.cpu_count()).read_text())  # the whole machine's
        if d.get("version") == PROFILE_VERSION:
            prof = Profile.from_dict(d)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        warnings.warn("no usable cached profile of this machine: the pipeline is planned from its spec sheet "
                      "(run `hetero profile` once)", stacklevel=2)
    return devices.runnable(inventory()), prof


def _rank_hardware(speed: RankSpeed, machines: dict):
    """The rank's host as the rank may use it: its own compute device, the CPU (host memory) and disks."""
    name = speed.host.hardware
    if name not in machines:
        from hetero.hardware import machine

        machines[name] = this_machine() if name == "this" else machine(name)
    hw, prof = machines[name]
    keep = tuple(d for d in hw.devices if d.name == speed.device or d.kind in ("cpu", "disk"))
    names = {d.name for d in keep}
    return dataclasses.replace(hw, devices=keep,
                               links=tuple(ln for ln in hw.links if {ln.src, ln.dst} <= names)), prof


def rank_budgets(spec: ModelSpec, speed: RankSpeed, memory_text: str | None, reserve: dict[str, int]
                 ) -> dict[str, int]:
    """A rank's budgets for its whole process: --memory (every rank alone, as `hetero run --memory`),
    else the hosts file's `memory` (what the rank may hold beyond its runtime) plus its reserve, else
    its share of the device's free memory."""
    from hetero.plan import parse_memory

    home = speed.device
    out = {home: speed.memory + (reserve.get(home, 0) if speed.host.memory else 0)}
    return {**out, **(parse_memory(memory_text, spec) if memory_text else {})}


def split_speeds(spec: ModelSpec, speeds: list[RankSpeed], memory_text: str | None, reserve: dict[str, int]
                 ) -> list[RankSpeed]:
    """The ranks as the split sees them: what each may hold beyond its runtime on its device."""
    out = []
    for s in speeds:
        b = rank_budgets(spec, s, memory_text, reserve)[s.device]
        out.append(dataclasses.replace(s, memory=max(0, b - reserve.get(s.device, 0))))
    return out


def pipeline_plan(spec: ModelSpec, speeds: list[RankSpeed], split: Split, reserve: dict[str, int],
                  objective: str = "decode", precisions: list[str] | None = None, memory_text: str | None = None,
                  prompt_tokens: int = 64, context: int | None = None, batch: int = 1) -> Plan:
    """One Plan: the split's stages, each rank's units planned per unit within its own budgets."""
    from hetero.plan.stages import StageRequest, pipeline_plan as join

    machines: dict = {}
    reqs = []
    for s, st in zip(speeds, split.stages):
        hw, prof = _rank_hardware(s, machines)
        reqs.append(StageRequest(st.rank, st.host, st.device, st.units, hw, prof, rank_budgets(spec, s, memory_text, reserve),
                                 dict(reserve), st.send_s, st.prefill_send_s))
    return join(spec, reqs, objective, prompt_tokens, context, batch, precisions)
