"""Mixture of experts on this machine (issue #20's two measured items), OLMoE-1B-7B's shape at 4 bits.

A. All in RAM: hetero and llama.cpp on the same Q4_0 GGUF (hetero writes it: `hetero compress
   synthetic:olmoe-1b-7b --format gguf --type Q4_0 -o FILE`), alternated A B A B on --threads threads.
   Decode against the bound: bytes a decode token reads (everything but the embedding table, the
   routed experts at k of E) / the hardware profile's memory read rate.
B. Experts streamed from disk: hetero at int4 with a CPU budget of 50% of the model's int4 size (the
   planner leaves experts units on disk; the LRU expert cache gets what the budget leaves). Footprint
   measured two ways: the engine's own monitor (runtime/memory.py: lifetime peak RSS + the cache
   files' page-cache pages) and an independent sampler over the decode (/proc/self/statm RSS +
   mincore of the same files); the expert cache's hit rate; decode measured vs the plan's prediction.
   Run in a child process (its peak RSS is the run's own), after a child that builds the int4 cache.

    .venv/bin/python benchmarks/moe_run.py [--only A|B] [--rounds 3] [--decode 32] [--prompt 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

SHAPE = "olmoe-1b-7b"


def gguf_path() -> Path:
    from same_file import files_dir, hetero_compress

    return hetero_compress(f"synthetic:{SHAPE}", "Q4_0", files_dir(SHAPE) / f"{SHAPE}.Q4_0.gguf")


def file_bytes_per_token(path: Path, k: int, n_experts: int) -> int:
    """What llama.cpp reads of the file per decode token: every tensor but the embedding table (a
    row lookup, unless the head is tied to it), the merged expert tensors at k of E."""
    from hetero.model.gguf_index import tensor_table

    t = tensor_table(path)
    skip = "token_embd.weight" if "output.weight" in t else None
    return int(sum(e.nbytes * (k / n_experts if "_exps" in n else 1) for n, e in t.items() if n != skip))


def hetero_bytes_per_token(model) -> int:
    """What hetero reads per decode token: every weight tensor once, an experts bank's at k of E, no
    embedding table unless tied."""
    from hetero.ops.experts import ExpertBank

    spec, seen, total = model.spec, set(), 0.0
    banks = [n for n, m in model.net.named_modules() if isinstance(m, ExpertBank)]
    for name, mod in model.net.named_modules():
        if (name == "embed" or name.startswith("embed.")) and not spec.tie_embeddings:
            continue
        share = spec.experts_per_token / spec.n_experts if any(name.startswith(b + ".") for b in banks) else 1
        for attr, t in vars(mod).items():
            if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size() * share
    return int(total)


def _ratio(h: list[float], l: list[float]) -> str:
    r = [x / y for x, y in zip(h, l)]
    return f"**{statistics.median(r):.2f}×** ({min(r):.2f}–{max(r):.2f})"


def table_a(path: Path, precisions: list[str], rounds: int, prompt_n: int, steps: int, threads: int) -> None:
    import llama_cpp

    import hetero
    from hetero.eval.corpus import eval_ids
    from same_file import hetero_run, llama_run, load_llama, machine_peaks

    read_bs, _, _, measured_at = machine_peaks()
    spec = hetero.spec(f"synthetic:{SHAPE}")
    lb = file_bytes_per_token(path, spec.experts_per_token, spec.n_experts)
    print(f"## A. {SHAPE} all in RAM, same file ({path.name}, {path.stat().st_size / 1e9:.2f} GB): hetero vs "
          f"llama.cpp {llama_cpp.__version__}, {threads} threads, prompt {prompt_n}, {steps} decode steps, "
          f"{rounds} rounds A B A B, medians\n")
    print(f"Bound = bytes per decode token / {read_bs / 1e9:.1f} GB/s (the hardware profile's memory read rate, "
          f"measured {measured_at}). Predicted: the plan's decode tok/s for the run.\n")
    print("| hetero precision | MB/token hetero / llama.cpp | bound tok/s hetero / llama.cpp | predicted tok/s | "
          "decode tok/s hetero / llama.cpp | decode ratio (min–max) | % of bound hetero / llama.cpp | "
          "prefill tok/s hetero / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    med = statistics.median
    for prec in precisions:
        t0 = time.perf_counter()
        model = hetero.load(str(path), dtype=prec, threads=threads)
        load_s = time.perf_counter() - t0
        llm = load_llama(path, threads, n_ctx=prompt_n + steps + 16)
        prompt = eval_ids(model.tokenizer, tokens=prompt_n)
        hetero_run(model, prompt[:16], 4), llama_run(llm, prompt[:16], 4)  # warm both
        h, l = [], []
        for _ in range(rounds):
            h.append(hetero_run(model, prompt, steps))
            l.append(llama_run(llm, prompt, steps))
        hd, ld = [x[1] for x in h], [x[1] for x in l]
        hb = hetero_bytes_per_token(model)
        pred = model.engine.plan.predicted.decode_tok_s
        print(f"| {prec} | {hb / 1e6:.0f} / {lb / 1e6:.0f} | {read_bs / hb:.1f} / {read_bs / lb:.1f} | {pred:.1f} | "
              f"{med(hd):.1f} / {med(ld):.1f} | {_ratio(hd, ld)} | {100 * med(hd) * hb / read_bs:.0f}% / "
              f"{100 * med(ld) * lb / read_bs:.0f}% | {med([x[0] for x in h]):.1f} / {med([x[0] for x in l]):.1f} |",
              flush=True)
        print(f"<!-- {prec}: hetero load {load_s:.0f} s; rounds hetero {[round(x, 1) for x in hd]}, "
              f"llama.cpp {[round(x, 1) for x in ld]} -->", flush=True)
        del model, llm


# ---- B: streamed ---------------------------------------------------------------------------------
class Sampler:
    """Peak of RSS (/proc/self/statm, every interval) + the files' page-cache bytes (mincore, every
    files_every intervals: over GBs of files it is milliseconds of kernel time), in a thread."""

    def __init__(self, files: list[Path], interval_s: float = 0.05, files_every: int = 10):
        from hetero.runtime.memory import cached_bytes, rss_bytes

        self.files, self.interval, self.every = files, interval_s, files_every
        self.peak = self.peak_cached = self.cached = 0
        self._rss, self._cached = rss_bytes, cached_bytes
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def sample(self, files: bool = True) -> None:
        if files:
            self.cached = sum(self._cached(f) for f in self.files)
            self.peak_cached = max(self.peak_cached, self.cached)
        self.peak = max(self.peak, self._rss() + self.cached)

    def _loop(self) -> None:
        i = 0
        while not self._stop.wait(self.interval):
            i += 1
            self.sample(files=i % self.every == 0)

    def __enter__(self):
        self.sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.sample()


def streamed_child(path: Path, budget: int, prompt_n: int, steps: int, threads: int, warm_only: bool) -> dict:
    """One streamed run in this (child) process; returns its figures."""
    import hetero
    from hetero.eval.corpus import eval_ids
    from same_file import hetero_run

    model = hetero.load(str(path), memory=f"cpu={budget}B", precisions=["int4"], threads=threads)
    if warm_only:
        return {}
    e = model.engine
    plan = e.plan
    units = {u.name: u for u in plan.units}
    on_disk = [n for n, u in units.items() if model.spec.is_experts_unit(n) and u.residency == "disk"]
    prompt = eval_ids(model.tokenizer, tokens=prompt_n)
    hetero_run(model, prompt[:16], 4)      # warm
    with Sampler(list(e.monitor.files)) as s:
        runs = [hetero_run(model, prompt, steps) for _ in range(2)]
    cache = next((x for x in e.report()["streaming"] if x.get("kind") == "expert_cache"), {})
    return {"budget": budget, "experts_on_disk": len(on_disk), "experts_units": sum(model.spec.is_experts_unit(n) for n in units),
            "predicted_decode": plan.predicted.decode_tok_s, "decode": [r[1] for r in runs], "prefill": [r[0] for r in runs],
            "engine_peak": e.footprint()["cpu"], "sampled_peak": s.peak, "sampled_cached": s.peak_cached,
            "cache": cache}


def table_b(path: Path, prompt_n: int, steps: int, threads: int) -> None:
    import hetero

    spec = hetero.spec(f"synthetic:{SHAPE}")
    int4 = sum(spec.unit_bytes(u, "int4") for u in spec.unit_names())
    budget = int4 // 2
    me = [sys.executable, __file__, "--_child", str(budget), "--prompt", str(prompt_n), "--decode", str(steps),
          "--threads", str(threads)]
    subprocess.run([*me, "--_warm"], check=True)   # builds the int4 tensor cache (not in the measured peak)
    out = subprocess.run(me, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    c = r["cache"]
    med = statistics.median(r["decode"])
    print(f"\n## B. {SHAPE} int4, experts streamed from disk, budget 50% of its int4 size "
          f"({int4 / 1e9:.2f} GB → cpu={budget / 1e9:.2f} GB), {threads} threads, prompt {prompt_n}, {steps} "
          f"decode steps, 2 runs\n")
    print("| experts units on disk | footprint engine monitor / independent sampler | vs budget | expert cache "
          "(capacity, hits / misses, hit rate) | read from disk | decode tok/s measured / predicted | measured / predicted |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {r['experts_on_disk']} of {r['experts_units']} | {r['engine_peak'] / 1e9:.2f} / {r['sampled_peak'] / 1e9:.2f} GB "
          f"(page cache {r['sampled_cached'] / 1e6:.0f} MB) | {100 * r['engine_peak'] / budget:.0f}% / "
          f"{100 * r['sampled_peak'] / budget:.0f}% | {c.get('capacity_experts')}, {c.get('hits')} / {c.get('misses')}, "
          f"{c.get('hit_rate')} | {c.get('read_bytes', 0) / 1e9:.2f} GB in {c.get('read_s', 0):.1f} s "
          f"({c.get('read_bytes', 0) / max(c.get('read_s', 0), 1e-9) / 1e9:.2f} GB/s) | "
          f"{med:.1f} / {r['predicted_decode']:.1f} | {med / r['predicted_decode']:.2f} |")
    print(f"<!-- decode runs {[round(x, 2) for x in r['decode']]}, prefill {[round(x, 1) for x in r['prefill']]} -->")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("A", "B"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="native,int4", help="A: hetero's precisions on the Q4_0 file")
    ap.add_argument("--_child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_warm", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = gguf_path()
    if a._child is not None:
        print(json.dumps(streamed_child(path, a._child, a.prompt, a.decode, a.threads, a._warm)))
        return 0
    print(f"# hetero MoE runs — {SHAPE}, torch {torch.__version__}, {a.threads} threads\n")
    print(f"Commands: `{' '.join(['python', *sys.argv])}`; the file: `hetero compress synthetic:{SHAPE} --format gguf "
          f"--type Q4_0 -o {path}`\n")
    if a.only in (None, "A"):
        table_a(path, a.precisions.split(","), a.rounds, a.prompt, a.decode, a.threads)
    if a.only in (None, "B"):
        table_b(path, a.prompt, a.decode, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
