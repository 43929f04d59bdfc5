"""How much KV memory the server's pool gets from the plan being served.

    pool = planned KV + half the headroom, clamped to [one context, max_concurrency contexts]

- planned KV: what the plan priced for its KV caches (memory_breakdown[device]["kv"]: batch x context
  tokens), already inside its budgets;
- headroom: budget - planned memory - the runtime's reserve, summed over the devices that hold
  decoder layers; only half of it is taken, the rest is left for the batched steps' activations
  (B decode rows plus a prefill chunk) that the plan, pricing one sequence, does not count;
- at least one whole context, so every request the context check lets in fits the pool alone (it may
  wait for blocks, never fail), and at most max_concurrency whole contexts, all the batch could use.

A request then waits in the queue until blocks for its whole length (prompt + max_tokens) are free.
"""
from __future__ import annotations


def pool_bytes(plan, token_bytes: int, context: int, max_concurrency: int) -> int:
    """Bytes for the KV pool; token_bytes: what one token's K and V cost over every layer in the pool."""
    planned = sum(int(b.get("kv", 0)) for b in (plan.memory_breakdown or {}).values())
    homes = {u.device for u in plan.units if u.name.startswith("layers.")}
    headroom = 0
    for d in homes:
        if d in plan.budgets:
            headroom += max(0, plan.budgets[d] - plan.memory.get(d, 0) - plan.reserve.get(d, 0))
    lo, hi = token_bytes * context, token_bytes * context * max(1, max_concurrency)
    return int(min(hi, max(lo, planned + headroom // 2)))
