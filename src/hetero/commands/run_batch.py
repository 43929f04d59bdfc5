"""`hetero run --batch B`: several prompts (a file, one per line) or one prompt repeated B times,
decoded together through runtime/batch.BatchRunner; each completion, then the aggregate rate."""
from __future__ import annotations

import json
import sys
import time


def read_prompts(path: str) -> list[str]:
    from hetero.errors import HeteroError

    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f]
    except OSError as e:
        raise HeteroError(f"cannot read prompts from {path}: {e.strerror or e}") from None
    prompts = [ln for ln in lines if ln.strip()]
    if not prompts:
        raise HeteroError(f"{path} holds no prompt (one per line)")
    return prompts


def run_batch(engine, prompts: list[str], batch: int, max_new_tokens: int, params, chat, as_json: bool) -> dict:
    """Every prompt as one request, at most `batch` decoding at once. With a seed, request i samples
    with seed + i, so repeats of one prompt differ as separate runs would."""
    import dataclasses

    from hetero.runtime.batch import BatchRunner

    model = engine.model
    tok = model.tokenizer
    ids = [model.prompt_ids(p, chat) for p in prompts]
    ctx = model.spec.max_context
    # room for every running request at its longest: the pool never makes one wait here
    longest = sorted((min(ctx, len(i) + max_new_tokens) for i in ids), reverse=True)[:batch]
    blocks = sum(-(-n // 16) for n in longest)
    from hetero.runtime.kvcache import KVPool

    runner = BatchRunner(model.net, pool=KVPool(model.net, n_blocks=blocks, block=16), max_batch=batch)
    rids = []
    for i, p in enumerate(ids):
        pi = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
        rids.append(runner.add(p, max_new_tokens, pi, tok.stop_ids))
    out = {r: [] for r in rids}
    finish: dict[int, str] = {}
    t0 = time.perf_counter()
    decode_s, decode_tokens = 0.0, 0
    while not runner.idle:
        t = time.perf_counter()
        events = runner.step()
        if runner.last_prefill_tokens == 0:  # a pure decode step: what the aggregate rate counts
            decode_s += time.perf_counter() - t
            decode_tokens += len(events)
        for ev in events:
            if ev.finish_reason != "stop":
                out[ev.request].append(ev.token)
            if ev.finish_reason:
                finish[ev.request] = ev.finish_reason
    wall = time.perf_counter() - t0
    completions = [{"prompt": p, "text": tok.decode(out[r]), "token_ids": out[r], "finish_reason": finish[r]}
                   for p, r in zip(prompts, rids)]
    result = {"batch": batch, "requests": len(prompts), "steps": runner.steps,
              "generated_tokens": sum(len(v) for v in out.values()), "wall_s": round(wall, 3),
              "decode_tok_s": round(decode_tokens / decode_s, 2) if decode_s > 0 else 0.0,
              "kv_blocks": runner.pool.n_blocks, "completions": completions}
    if as_json:
        print(json.dumps(result))
    else:
        for i, c in enumerate(completions):
            print(f"--- [{i}] {c['finish_reason']}")
            print(c["text"])
        print(f"[{len(prompts)} requests, batch {batch}, {result['generated_tokens']} generated in "
              f"{wall:.2f} s | aggregate decode {result['decode_tok_s']:.1f} tok/s]", file=sys.stderr)
    return result
