"""LoRA fine-tune figures on the built-in model: a licence text shipped with the OS, split in two.

    python benchmarks/finetune.py [--steps 60] [--batch 2] [--seq-len 256] [--lr 5e-4] [--threads N] [--out DIR]

The defaults are `hetero finetune`'s own (every linear targeted, rank 8, alpha 16, warm-up over 5% of
the steps then a cosine) at 60 steps: ~5 passes over the ~23 training sequences.

1. Held-out perplexity (the last ~20% of the text, split at a paragraph) and built-in corpus
   perplexity (pydoc, first --corpus-tokens tokens), before and after the adapter.
2. The same run under a --memory budget that makes the plan stream base units from disk: its peak
   (the child process's own peak RSS from the kernel, and hetero's footprint monitor) against the
   budget, its loss curve against the in-RAM run's, measured vs predicted step time (and the CPU
   seconds per step, which a shared machine's waiting leaves out).
Prints one JSON object (and writes it to OUT/finetune.json).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TEXT = "/usr/share/common-licenses/GPL-3"
TIMES = ("plan", "checkpointing", "loss_first", "loss_last", "measured_tokens_s", "measured_step_s",
         "predicted_step_s", "step_vs_predicted", "measured_cpu_step_s", "threads")


def hetero(*args: str) -> tuple[dict, int]:
    """Run `hetero ARGS --json` in a child; (its JSON, its peak RSS in bytes from the kernel)."""
    p = subprocess.run([sys.executable, "-c", "from hetero.cli import main; main()", *args, "--json"],
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"hetero {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    # ru_maxrss of children is the largest of any child so far: a smaller later child reads as the
    # earlier peak, so runs are ordered big-to-small where it matters (the budgeted run is measured alone)
    return json.loads(p.stdout.strip().splitlines()[-1]), peak


def split(out: Path) -> tuple[Path, Path]:
    t = Path(TEXT).read_text()
    cut = t.rfind("\n\n", 0, int(len(t) * 0.8))
    (out / "train.txt").write_text(t[:cut])
    (out / "heldout.txt").write_text(t[cut:])
    return out / "train.txt", out / "heldout.txt"


def ppl(args, text: str | None, adapter: str | None = None, tokens: int = 0) -> float:
    a = ["eval", "smollm2-135m", "--context", "256", "--stride", "256", "--tokens", str(tokens),
         "--no-progress", "--dtype", args.precision]
    a += ["--text", text] if text else []
    a += ["--adapter", adapter] if adapter else []
    a += ["--threads", str(args.threads)] if args.threads else []
    return hetero(*a)[0]["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of every run (default: torch's)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--precision", default="bf16", help="the base's precision in both runs")
    ap.add_argument("--corpus-tokens", type=int, default=2048)
    ap.add_argument("--budget", default=None, help="the streamed run's --memory (default: searched)")
    ap.add_argument("--out", default="/tmp/hetero-finetune-bench")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = split(out)
    common = ["smollm2-135m", "--data", str(train), "--steps", str(args.steps), "--batch", str(args.batch),
              "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--precisions", args.precision,
              "--targets", args.targets, "--rank", str(args.rank)]
    common += ["--threads", str(args.threads)] if args.threads else []
    r = {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
         "targets": args.targets, "rank": args.rank,
         "precision": args.precision, "threads": args.threads}
    # the streamed run first: ru_maxrss of children only grows, so the first child's peak is its own
    budget = args.budget
    if budget is None:  # the largest budget (25 MB steps) whose plan streams a third of the layers or more
        for mb in range(875, 300, -25):
            d, _ = hetero("finetune", *common, "--dry-run", "--checkpointing", "--memory", f"cpu={mb}MB")
            if "disk" in d["plan"] and int(d["plan"].split(" cpu/bf16/disk")[0].split()[-1]) >= 10:
                budget = f"cpu={mb}MB"
                break
    t0 = time.time()
    s, s_peak = hetero("finetune", *common, "-o", str(out / "a_streamed"), "--memory", budget, "--checkpointing")
    s["wall_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    m, m_peak = hetero("finetune", *common, "-o", str(out / "a_ram"))
    m["wall_s"] = round(time.time() - t0, 1)
    base_held, base_corpus = ppl(args, str(held)), ppl(args, None, tokens=args.corpus_tokens)
    ad_held = ppl(args, str(held), str(out / "a_ram"))
    ad_corpus = ppl(args, None, str(out / "a_ram"), tokens=args.corpus_tokens)
    log_m = json.loads((out / "a_ram" / "hetero_training.json").read_text())["log"]
    log_s = json.loads((out / "a_streamed" / "hetero_training.json").read_text())["log"]
    diffs = [abs(a[1] - b[1]) for a, b in zip(log_m, log_s)]
    budget_bytes = s["budget_bytes"]
    r.update({
        "heldout_ppl": {"base": round(base_held, 3), "adapter": round(ad_held, 3),
                        "change": round(ad_held / base_held - 1, 4)},
        "corpus_ppl": {"base": round(base_corpus, 3), "adapter": round(ad_corpus, 3),
                       "change": round(ad_corpus / base_corpus - 1, 4)},
        "in_ram": {k: m[k] for k in (*TIMES, "peak_footprint_bytes", "wall_s")},
        "streamed": {**{k: s[k] for k in (*TIMES, "peak_footprint_bytes", "budget_bytes", "streaming", "wall_s")},
                     "memory": budget, "peak_rss_kernel_bytes": s_peak,
                     "peak_over_budget": round(max(s_peak, s["peak_footprint_bytes"]) / budget_bytes - 1, 4)},
        "loss_curve_max_abs_diff": round(max(diffs), 5) if diffs else None,
        "loss_curve_mean_abs_diff": round(sum(diffs) / len(diffs), 5) if diffs else None,
        "in_ram_peak_rss_kernel_bytes": m_peak,
    })
    (out / "finetune.json").write_text(json.dumps(r, indent=2))
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "src"))
    main()
