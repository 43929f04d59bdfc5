"""Batch size as a plan decision: price each candidate B with its own best placement, pick the B
the objective likes best within the budgets (and a bound on the time per token, when given).

A decode step of B sequences reads every weight once (a streamed unit's disk read included) and
does each row's compute and KV read apiece (cost.compute_terms), so more rows amortise the weight
traffic until the row kernels' compute catches up — FlexGen's point for offloaded models. Memory
grows with B (KV for B contexts, the step's activations), which the placement must make room for:
a larger B may push more units to disk, so each B is solved on its own.

    plan = plan_batch(spec, hw, profile, "auto", memory=..., max_latency_ms=...)
    plan.batch, plan.batch_options   # the chosen B; every B priced, with why it lost
"""
from __future__ import annotations

import dataclasses

from hetero.errors import HeteroError
from hetero.plan.plan import BatchOption, Plan, Why

AUTO_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # up to the row kernels' M (cost.Coefficients.rows_max)
MAX_BATCH = 256
# a larger batch must gain more than this share of the objective: past it, more rows buy little
# rate for their memory and their time per token
BATCH_GAIN = 0.02


def parse_batches(text: str | int | None) -> list[int] | None:
    """"auto" -> AUTO_BATCHES; "1,8,32" -> those; "8" -> [8] (a fixed size); None -> None."""
    if text is None:
        return None
    if isinstance(text, int):
        text = str(text)
    t = text.strip().lower()
    if t == "auto":
        return list(AUTO_BATCHES)
    try:
        out = sorted({int(x) for x in t.split(",") if x.strip()})
    except ValueError:
        raise HeteroError(f"--batch takes auto, a size or sizes separated by commas, got {text!r}") from None
    if not out or out[0] < 1 or out[-1] > MAX_BATCH:
        raise HeteroError(f"--batch takes sizes from 1 to {MAX_BATCH}, got {text!r}")
    return out


def auto_sizes(n: int) -> list[int]:
    """The sizes `--batch auto` picks from for n requests: AUTO_BATCHES up to n, and n itself."""
    return sorted({b for b in AUTO_BATCHES if b <= n} | ({n} if n <= AUTO_BATCHES[-1] else set()))


def score(option: BatchOption, objective: str) -> float:
    """What the objective maximises over batch sizes: aggregate decode tok/s (decode), tokens per
    second with every prompt's prefill (throughput); ttft wants the first token soonest: B = 1."""
    if objective == "throughput":
        return option.throughput_tok_s
    if objective == "ttft":
        return 1.0 / option.batch
    return option.decode_tok_s


def plan_batch(spec, hardware, profile, batches: list[int] | str, max_latency_ms: float | None = None,
               explain: bool = True, **kw) -> Plan:
    """make_plan at every batch size of `batches` ("auto": AUTO_BATCHES), the best one returned with
    every size's prediction in `batch_options`. kw: make_plan's other arguments (memory, objective,
    prompt_tokens, context, precisions, reserve, max_quality_loss, kv_dtype, ...)."""
    from hetero.plan.make import make_plan

    sizes = parse_batches(batches) if isinstance(batches, str) else sorted(set(batches))
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise HeteroError(f"--max-latency-ms must be > 0 (got {max_latency_ms})")
    kw.pop("batch", None)
    objective = kw.get("objective", "decode")
    plans: dict[int, Plan] = {}
    errors: dict[int, str] = {}
    for b in sizes:
        if errors:  # memory grows with the batch: past one that does not fit, none does
            errors[b] = next(iter(errors.values()))
            continue
        try:
            plans[b] = make_plan(spec, hardware, profile, batch=b, ragged=True, explain=False, **kw)
        except HeteroError as e:
            errors[b] = str(e)
    if not plans:
        raise HeteroError(f"no batch size fits: {errors[min(errors)]}")
    options = {b: BatchOption(b, True, p.predicted.decode_tok_s, p.predicted.decode_ms, p.predicted.throughput_tok_s)
               for b, p in plans.items()}
    ok = [b for b in plans if max_latency_ms is None or options[b].decode_ms <= max_latency_ms]
    if not ok:
        fastest = min(plans, key=lambda b: options[b].decode_ms)
        raise HeteroError(f"no batch size keeps a step within {max_latency_ms:g} ms: the fastest, batch "
                          f"{fastest}, takes {options[fastest].decode_ms:.1f} ms per token")
    best = max(score(options[b], objective) for b in ok)
    chosen = min(b for b in ok if score(options[b], objective) >= best * (1 - BATCH_GAIN))
    top = max(ok, key=lambda b: (score(options[b], objective), -b))
    unit = {"throughput": "tok/s with prefill", "ttft": ""}.get(objective, "decode tok/s")
    out = []
    for b in sizes:
        if b in errors:
            out.append(BatchOption(b, False, note=errors[b].split(";")[0]))
            continue
        o = options[b]
        note = ""
        if b not in ok:
            note = f"a step takes {o.decode_ms:.1f} ms, over the {max_latency_ms:g} ms bound"
        elif b != chosen and score(o, objective) > score(options[chosen], objective):
            note = f"gains under {BATCH_GAIN:.0%} over batch {chosen} for its memory and time per token"
        elif b != chosen:
            note = f"{score(o, objective) / score(options[chosen], objective):.2f}x batch {chosen}'s rate"
        out.append(dataclasses.replace(o, note=note))
    why = _why(chosen, top, options, errors, objective, unit, max_latency_ms)
    final = plans[chosen]
    if explain:  # the chosen size's binding constraints and alternatives, as a fixed batch explains them
        final = make_plan(spec, hardware, profile, batch=chosen, ragged=True, explain=True, **kw)
    return dataclasses.replace(final, batch_options=tuple(out), max_latency_ms=max_latency_ms,
                               why=dataclasses.replace(final.why, notes=(why,) + final.why.notes))


def _why(chosen: int, top: int, options: dict[int, BatchOption], errors: dict[int, str], objective: str,
         unit: str, max_latency_ms: float | None) -> str:
    o, one = options[chosen], options.get(1)
    text = f"batch {chosen}"
    if objective == "ttft":
        return text + ": the first token soonest comes from one prompt at a time"
    text += f": {score(o, objective):.2f} {unit}"
    if one is not None and chosen != 1:
        text += (f", {o.decode_tok_s / one.decode_tok_s:.1f}x batch 1's decode rate (each step reads the "
                 "weights once for all rows)")
    if top != chosen:
        text += f"; batch {top} would gain {score(options[top], objective) / score(o, objective) - 1:.1%} more"
    bigger = sorted(b for b in errors if b > chosen)
    if bigger:
        text += f"; batch {bigger[0]} does not fit the budgets"
    if max_latency_ms is not None:
        text += f"; steps within {max_latency_ms:g} ms per token"
    return text
