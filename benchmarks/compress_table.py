"""The compression table of docs/BENCHMARKS.md: method, bytes, perplexity, Δ%, decode tok/s.

Every variant is scored by the same evaluator on the same tokens against the model's own
dequantised fp32 weights. Decode tok/s is measured per runtime kernel (fp32 dense, int8, int4),
side by side in this run: fake-quant, pruned and k-means variants hold dense weights and have no
dedicated kernel here, so they decode at the dense rate.

    .venv/bin/python benchmarks/compress_table.py --tokens 1024 --json out.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def gguf_roundtrip(loaded, qtype: str) -> dict:
    """Tensors after a GGUF block-quantisation round trip (what a reload of the export reads)."""
    import gguf
    import numpy as np

    from hetero.compress.core import linear_names
    from hetero.compress.gguf_export import quantize

    qt = gguf.GGMLQuantizationType[qtype]
    out = dict(loaded.tensors)
    for n in linear_names(loaded.spec):
        a = np.ascontiguousarray(loaded.tensors[n].numpy(), dtype=np.float32)
        out[n] = torch.from_numpy(gguf.quants.dequantize(quantize(a, qtype), qt).reshape(a.shape).copy())
    return out


def decode_tok_s(loaded, precision: str, tokens: int = 32) -> float:
    from hetero.compress.core import build_net
    from hetero.model.units import UnitConfig

    net = build_net(loaded.spec, loaded.tensors, default=UnitConfig("cpu", precision))
    ids = torch.tensor([loaded.tokenizer.encode("The Python language reference says that")])
    cache = net.new_cache(1, ids.shape[1] + tokens + 1)
    logits = net(ids, 0, cache)
    pos, nxt = ids.shape[1], logits.argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = net(nxt, pos, cache)
        nxt, pos = logits.argmax(-1, keepdim=True), pos + 1
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--distill-steps", type=int, default=0, help="0 = skip the distillation row")
    ap.add_argument("--only", default="", help="comma-separated row names to run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hetero.compress.core import build_net, fp32_bytes, load_model
    from hetero.compress.methods import Options, apply
    from hetero.dtypes import storage_bytes
    from hetero.eval.corpus import eval_ids
    from hetero.eval.perplexity import perplexity
    from hetero.model.spec import expected_tensors

    loaded = load_model(args.model)
    ids = eval_ids(loaded.tokenizer, tokens=args.tokens)
    speed = {p: decode_tok_s(loaded, p) for p in ("fp32", "int8", "int4")}
    base = perplexity(build_net(loaded.spec, loaded.tensors), ids, args.context, args.context, progress=False)
    rows = [{"method": "fp32 (dequantised source)", "bytes": fp32_bytes(loaded.spec), "perplexity": base.perplexity,
             "kernel": "fp32"}]

    def gguf_bytes(qtype):
        return sum(storage_bytes(qtype, s) if len(s) == 2 else 4 * s[0] for _, s in expected_tensors(loaded.spec))

    plan = [
        ("int8 per-channel RTN", "int8", {}, "int8"),
        ("int4 g64 asym RTN", "int4", {"group": 64}, "int4"),
        ("int4 g64 asym GPTQ", "gptq", {"group": 64}, "int4"),
        ("int4 g32 sym RTN", "int4", {"group": 32, "sym": True}, "int4"),
        ("int4 g32 sym GPTQ", "gptq", {"group": 32, "sym": True}, "int4"),
        ("k-means 16 values/row", "kmeans", {"values": 16}, "fp32"),
        ("magnitude 50%", "magnitude", {"sparsity": 0.5}, "fp32"),
        ("Wanda 50%", "wanda", {"sparsity": 0.5}, "fp32"),
        ("magnitude 2:4", "magnitude", {"nm": "2:4"}, "fp32"),
        ("Wanda 2:4", "wanda", {"nm": "2:4"}, "fp32"),
        ("GGUF Q8_0", "gguf", "Q8_0", "int8"),
        ("GGUF Q4_0", "gguf", "Q4_0", "int4"),
        ("GGUF Q4_1", "gguf", "Q4_1", "int4"),
    ]
    if args.distill_steps:
        plan.append((f"distilled {2 * loaded.spec.n_layers // 3}/{loaded.spec.n_layers} layers",
                     "distill", {"steps": args.distill_steps, "calib_tokens": args.distill_steps * 128}, "fp32"))
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    for name, method, o, kernel in plan:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        spec = loaded.spec
        if method == "gguf":
            tensors, nbytes = gguf_roundtrip(loaded, o), gguf_bytes(o)
        else:
            opts = Options(**{"progress": False, "calib_tokens": args.calib_tokens, **o})
            tensors, rec = apply(method, loaded, opts)
            spec, nbytes = rec.pop("_spec", spec), rec["bytes"]
        secs = time.perf_counter() - t0
        r = perplexity(build_net(spec, tensors), ids, args.context, args.context, progress=False)
        row = {"method": name, "bytes": nbytes, "perplexity": r.perplexity, "kernel": kernel,
               "compress_s": round(secs, 1)}
        if method == "distill":
            keep = rec["kept_layers"]
            plain = perplexity(build_net(spec, {**tensors, **_undistilled(loaded, keep)}), ids, args.context,
                               args.context, progress=False)
            row["undistilled_perplexity"] = plain.perplexity
            row["kernel"] = "fp32"
        rows.append(row)
        print(json.dumps(row), flush=True)
    for r in rows:
        r["delta_pct"] = 100 * (r["perplexity"] / base.perplexity - 1)
        r["decode_tok_s"] = speed[r["kernel"]]
    meta = {"model": args.model, "tokens": base.tokens, "context": args.context, "stride": args.context,
            "corpus": "pydoc_data.topics (first tokens)", "calib_tokens": args.calib_tokens, "threads": args.threads,
            "decode_tok_s": speed}
    print("| method | bytes (MB) | perplexity | Δ% | decode tok/s (kernel) |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        extra = f" (undistilled {r['undistilled_perplexity']:.2f})" if "undistilled_perplexity" in r else ""
        print(f"| {r['method']} | {r['bytes'] / 1e6:.1f} | {r['perplexity']:.3f}{extra} | {r['delta_pct']:+.2f} | "
              f"{r['decode_tok_s']:.1f} ({r['kernel']}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def _undistilled(loaded, keep):
    from hetero.compress.distill import student_tensors

    return student_tensors(loaded.tensors, keep)


if __name__ == "__main__":
    main()
