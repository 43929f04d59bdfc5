"""RTN vs GPTQ vs AWQ at int4 (docs/BENCHMARKS.md): each variant is written as the GGUF it makes
(its grid as Q4_1 / Q4_0 blocks) and that file is evaluated as `hetero eval` runs it (native), on
the built-in corpus and on a held-out text.

    PYTHONPATH=src .venv/bin/python benchmarks/awq_table.py --json awq.json \
        --heldout /usr/share/common-licenses/GPL-3
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROWS = [("rtn", 32, False), ("gptq", 32, False), ("awq", 32, False),
        ("rtn", 128, False), ("gptq", 128, False), ("awq", 128, False),
        ("rtn", 32, True), ("gptq", 32, True), ("awq", 32, True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--heldout", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--only", default="", help="comma-separated method:group:sym rows, e.g. gptq:128:asym")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import hetero
    from hetero.compress.core import build_net, load_model
    from hetero.compress.gguf_export import write_gguf
    from hetero.compress.methods import Options, apply
    from hetero.eval.corpus import eval_ids, read_text
    from hetero.eval.perplexity import perplexity

    loaded = load_model(args.model)
    texts = {"pydoc": eval_ids(loaded.tokenizer, None, args.tokens),
             Path(args.heldout).name: eval_ids(loaded.tokenizer, read_text(args.heldout), args.tokens)}
    rows = []

    def ppl(net) -> dict:
        return {k: round(perplexity(net, ids, 512, 256, progress=False).perplexity, 4) for k, ids in texts.items()}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")

    rows.append({"method": "source (dequantised fp32)", "perplexity": ppl(build_net(loaded.spec, loaded.tensors))})
    save()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        for method, group, sym in ROWS:
            key = f"{method}:{group}:{'sym' if sym else 'asym'}"
            if only and key not in only:
                continue
            t0 = time.perf_counter()
            tensors, rec = apply(method, loaded, Options(group=group, sym=sym, calib_tokens=args.calib_tokens,
                                                         progress=False))
            secs = time.perf_counter() - t0
            out = Path(tmp) / "m.gguf"
            rec = write_gguf(out, loaded, loaded.spec, tensors, "Q8_0", rec, force=True, grids=rec.pop("_grids"))
            m = hetero.load(str(out), dtype="native")
            row = {"method": key, "format": rec["format"], "bytes": rec["bytes"], "perplexity": ppl(m.net),
                   "compress_s": round(secs, 1)}
            for k in ("mean_alpha", "calib_output_error_vs_rtn"):
                if k in rec:
                    row[k] = rec[k]
            m.engine.close()
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()


if __name__ == "__main__":
    main()
