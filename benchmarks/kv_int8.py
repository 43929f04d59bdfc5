"""int8 KV cache: what it costs in perplexity and what it buys in a fixed KV budget.

    PYTHONPATH=src .venv/bin/python benchmarks/kv_int8.py ppl [--tokens 4096] [--dtype native]
    PYTHONPATH=src .venv/bin/python benchmarks/kv_int8.py pool [--budget-mb 16]

`ppl`: the built-in model's perplexity (the `hetero eval` evaluator: context 512, stride 256) with the
KV cache held as the layers' dtype, bf16 and int8 (per token and head), and, as the alternative the
literature suggests for keys, int8 keys quantised per channel over groups of 16 tokens (values per
token). That variant is simulated (the key values rounded to its grid, held in fp32): it measures
quality only, to choose the layout.

`pool`: one KV budget in bytes as a batch pool (runtime/kvcache.KVPool) in bf16 and in int8: blocks
and tokens held, how many sequences of 128 tokens run at once (BatchRunner), and whether one long
request (1000 prompt tokens) is taken or refused.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import hetero
from hetero.eval.corpus import eval_ids, read_text
from hetero.eval.perplexity import perplexity
from hetero.errors import HeteroError
from hetero.model.kvstore import CastKV

GROUP = 16  # tokens sharing one per-channel key scale (a pool block)


class ChannelKeys(CastKV):
    """Keys rounded to an int8 grid per (head, channel) over groups of GROUP tokens, kept in fp32."""

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        B, K, T, D = value.shape
        pad = -T % GROUP
        v = torch.nn.functional.pad(value.float(), (0, 0, 0, pad)).view(B, K, -1, GROUP, D)
        scale = (v.abs().amax(3, keepdim=True) / 127).clamp_min(2.0 ** -24).half().float()
        q = (torch.round(v / scale).clamp(-127, 127) * scale).view(B, K, -1, D)[:, :, :T]
        self.data[idx] = q.to(self.data.dtype)


def ppl(args) -> list[dict]:
    m = hetero.load("smollm2-135m", dtype=args.dtype)
    ids = eval_ids(m.tokenizer, read_text(None), args.tokens)
    rows = []
    for kind in ("auto", "bf16", "int8", "int8-channel-keys"):
        m.net.kv_dtype = "int8" if kind.startswith("int8") else kind
        new_cache = m.net.new_cache
        if kind == "int8-channel-keys":  # int8 values as built; keys per channel (simulated)
            def new_cache(batch, max_len, _make=m.net.new_cache):
                c = _make(batch, max_len)
                c.k = [ChannelKeys(k.shape, torch.float32, k.dtype, k.device) for k in c.k]
                return c
        net = _With(m.net, new_cache)
        r = perplexity(net, ids, 512, 256, progress=False)
        rows.append({"kv": kind, "perplexity": round(r.perplexity, 4), "seconds": round(r.seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["perplexity"]
    for r in rows:
        r["delta_pct"] = round(100 * (r["perplexity"] / base - 1), 3)
    return rows


class _With:
    """The decoder with another new_cache (the evaluator's only other call is the forward)."""

    def __init__(self, net, new_cache):
        self.net, self.new_cache, self.spec = net, new_cache, net.spec

    def __call__(self, *a, **kw):
        return self.net(*a, **kw)


def pool(args) -> list[dict]:
    from hetero.runtime.batch import BatchRunner
    from hetero.runtime.kvcache import KVPool

    m = hetero.load("smollm2-135m", dtype=args.dtype)
    budget = args.budget_mb << 20
    g = torch.Generator().manual_seed(0)
    rows = []
    for kd in ("bf16", "int8"):
        p = KVPool(m.net, budget_bytes=budget, kv_dtype=kd)
        row = {"kv": kd, "budget_bytes": budget, "blocks": p.n_blocks, "tokens": p.n_blocks * p.block,
               "pool_bytes": p.nbytes()}
        # sequences of --seq-tokens (8 of them new) offered --offer at once: how many run together
        S, n = args.seq_tokens, args.offer
        runner = BatchRunner(m.net, pool=p, max_batch=n)
        for _ in range(n):
            runner.add(torch.randint(0, m.spec.vocab_size, (S - 8,), generator=g).tolist(), 8)
        most, t0 = 0, time.perf_counter()
        while not runner.idle:
            runner.step()
            most = max(most, len(runner.running))
        row[f"concurrent_{S}"] = most
        row["concurrent_s"] = round(time.perf_counter() - t0, 1)
        # one long request: --long prompt tokens + 8 new
        runner = BatchRunner(m.net, pool=KVPool(m.net, budget_bytes=budget, kv_dtype=kd))
        try:
            rid = runner.add(torch.randint(0, m.spec.vocab_size, (args.long,), generator=g).tolist(), 8)
            t0 = time.perf_counter()
            row[f"long_{args.long + 8}"] = f"completed, {len(runner.run()[rid])} tokens in {time.perf_counter() - t0:.0f} s"
        except HeteroError as e:
            row[f"long_{args.long + 8}"] = f"refused: {e}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("ppl", "pool"))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="native", help="the layers' precision (native: the file as stored)")
    ap.add_argument("--budget-mb", type=int, default=16)
    ap.add_argument("--seq-tokens", type=int, default=128, help="pool: tokens per concurrent sequence")
    ap.add_argument("--offer", type=int, default=12, help="pool: sequences offered at once")
    ap.add_argument("--long", type=int, default=1000, help="pool: prompt tokens of the long request")
    args = ap.parse_args()
    rows = ppl(args) if args.what == "ppl" else pool(args)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
