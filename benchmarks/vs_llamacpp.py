"""Decode and prefill speed: hetero vs llama.cpp on the same GGUF, same thread count, side by side.

Both start from the built-in SmolLM2-135M Q4_1 GGUF. hetero runs int8 and int4 weight-only (bf16
activations) quantised from it; llama.cpp (llama-cpp-python) runs the same weights at the matching
width: int4 against the file's own Q4_1, int8 against Q8_0, bf16 against BF16 and fp32 against F32,
each made from the same file by llama.cpp's own quantizer (cached under the cache dir). Rounds
alternate so both see the same machine noise; ratios are per round. Quality: perplexity of each on the same
tokens of the built-in evaluation text (non-overlapping 512-token windows, same scoring).

    .venv/bin/python benchmarks/vs_llamacpp.py [--precisions int4,int8] [--rounds 3] [--tokens 64]
    .venv/bin/python benchmarks/vs_llamacpp.py --shape tinyllama-1.1b [--rounds 3 --prompt 512 --decode 32]
    .venv/bin/python benchmarks/vs_llamacpp.py --perplexity [--ppl-tokens 2048]

--shape and --perplexity run both engines on the very same GGUF files (benchmarks/same_file.py):
at a real shape llama.cpp's fixed per-op costs no longer dominate, which the 135M model's do.

Without llama-cpp-python (`make bench-peers` installs it) hetero's figures are still printed, with a note.
Also printed: % of the memory-bandwidth bound in decode, % of the bf16 GEMM bound in prefill, and
whether greedy tokens on the fast (compiled-kernel) path equal those of the stock-torch path.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import torch

PROMPT = "Write a long story about a dragon who learns to cook."
STREAM_GBS = 32.0         # streaming read, GB/s (shared/DESIGN.md, measured on this machine)
GEMM_GFLOPS = 386.0       # bf16 GEMM, GFLOP/s (same source)


def hetero_decode(model, prompt_ids, tokens):
    from hetero.runtime.generate import generate_step
    from hetero.runtime.sampling import Sampler, SamplingParams

    st, ids = [], []
    for tid, t in generate_step(model.net, prompt_ids, tokens, Sampler(SamplingParams()), stop_ids=set()):
        st.append(t), ids.append(tid)
    return (len(st) - 1) / (st[-1] - st[0]), ids


def hetero_prefill(model, ids):
    net = model.net
    cache = net.new_cache(1, len(ids) + 1)
    t = time.perf_counter()
    net(torch.tensor([ids]), 0, cache)
    return len(ids) / (time.perf_counter() - t)


def llama_decode(llm, prompt_ids, tokens):
    llm.reset()
    st = []
    for _ in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        st.append(time.perf_counter())
        if len(st) >= tokens:
            break
    return (len(st) - 1) / (st[-1] - st[0])


def llama_prefill(llm, ids):
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    return len(ids) / (time.perf_counter() - t)


def window_ppl(logits_of, ids, ctx=512):
    """Perplexity over non-overlapping windows; logits_of(window ids) -> [T, V] float logits."""
    nll, n = 0.0, 0
    for b in range(0, len(ids) - 1, ctx):
        w = ids[b:b + ctx]
        if len(w) < 2:
            break
        logp = torch.log_softmax(logits_of(w)[:-1].float(), dim=-1)
        nll += float(-logp.gather(1, torch.tensor(w[1:])[:, None]).sum())
        n += len(w) - 1
    return math.exp(nll / n)


def hetero_logits(model):
    def f(w):
        cache = model.net.new_cache(1, len(w))
        return model.net(torch.tensor([w]), 0, cache, last_only=False)[0]
    return f


def llama_logits(llm):
    import numpy as np

    def f(w):
        llm.reset()
        llm.eval(w)
        return torch.from_numpy(np.array(llm.scores[:len(w)], dtype=np.float32))
    return f


def weight_bytes_per_token(net) -> int:
    """Bytes of weights read per decoded token (every linear layer once; the embedding row is noise)."""
    total = 0
    for mod in net.modules():
        for name in ("weight", "qweight", "packed", "scales", "scales_zeros", "data"):  # data: GGUF blocks
            t = getattr(mod, name, None)
            if isinstance(t, torch.Tensor) and mod is not net:
                total += t.numel() * t.element_size()
    return total


PEER_TYPE = {"native": "Q4_1", "int4": "Q4_1", "int8": "Q8_0", "bf16": "BF16", "fp32": "F32"}


def peer_gguf(src, prec: str):
    """The llama.cpp file for hetero precision `prec`: the built-in Q4_1 itself for native and int4, else
    llama.cpp's own requantisation of it (the same weights, widened) into the cache dir."""
    from pathlib import Path

    from hetero.paths import cache_dir
    from same_file import llama_quantize

    kind = PEER_TYPE[prec]
    if kind == "Q4_1":
        return Path(src), kind
    out = cache_dir() / "peers" / f"{Path(src).stem}.{kind}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    return llama_quantize(Path(src), out, kind), kind


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default="native,int4,int8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", "--decode", dest="tokens", type=int, default=64, help="decode steps")
    ap.add_argument("--prefill", "--prompt", dest="prefill", type=int, default=512, help="prompt tokens")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--shape", help="same-file speed at a synthetic shape (tinyllama-1.1b, llama2-7b-smol)")
    ap.add_argument("--file", help="same-file speed on one GGUF: a path or a built-in name (gemma3-270m)")
    ap.add_argument("--perplexity", action="store_true", help="same-file perplexity of the built-in model")
    ap.add_argument("--hetero-precision", default="native",
                    help="--shape/--perplexity: hetero's precision (native: the file's own types)")
    ap.add_argument("--decode-acts", default=None,
                    help="--shape/--file: hetero's decode activation modes to run, alternated with llama.cpp in "
                         "each round (bf16,int8; default: the current one, HETERO_DECODE_ACT)")
    ap.add_argument("--kquant", default="Q4_K_M", choices=("Q4_K_M", "Q4_K_S"),
                    help="--shape/--perplexity: the k-quant file llama.cpp's quantizer makes")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    if a.shape or a.perplexity or a.file:
        import same_file

        acts = a.decode_acts.split(",") if a.decode_acts else None
        if a.file:
            same_file.file_speed_table(a.file, a.hetero_precision, a.rounds, a.prefill, a.tokens, a.threads, acts)
        if a.shape:
            same_file.speed_table(a.shape, a.hetero_precision, a.rounds, a.prefill, a.tokens, a.threads, a.kquant,
                                  acts)
        if a.perplexity:
            same_file.perplexity_table(a.hetero_precision, a.ppl_tokens, a.threads, a.kquant)
        return 0
    import hetero
    from hetero.eval.corpus import eval_ids
    from hetero.model.sources import builtin_path
    from hetero.ops import kernels

    path = builtin_path("smollm2-135m")
    try:
        from llama_cpp import Llama, __version__ as lver
    except ImportError:
        Llama, lver = None, None

    def peer(prec):
        if Llama is None:
            return None, "-"
        f, kind = peer_gguf(path, prec)
        return Llama(model_path=str(f), n_threads=a.threads, n_threads_batch=a.threads, n_ctx=2048,
                     n_batch=512, logits_all=True, verbose=False), kind
    print(f"# hetero vs llama.cpp — SmolLM2-135M ({path.name}), {a.threads} threads, torch {torch.__version__}, "
          f"llama-cpp-python {lver or 'NOT INSTALLED (make bench-peers): llama.cpp columns empty'}\n")
    t0 = time.perf_counter()
    first = hetero.load("smollm2-135m", dtype=a.precisions.split(",")[0])
    print(f"compiled kernels: {'yes' if kernels.get() else 'no (stock torch)'}; first load incl. any kernel build "
          f"{time.perf_counter() - t0:.1f}s (built once per torch version into the cache, reused after)\n")
    del first
    prompt_short = None
    long_ids = None
    print("| hetero precision | llama.cpp type | decode hetero / llama.cpp tok/s | decode ratio (min–max) | "
          f"% of bandwidth bound | prefill {a.prefill} hetero / llama.cpp tok/s | prefill ratio (min–max) | "
          "% of GEMM bound | ppl hetero / llama.cpp | fast == stock tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for prec in a.precisions.split(","):
        llm, kind = peer(prec)
        kernels.set_enabled(False)
        stock = hetero.load("smollm2-135m", dtype=prec)
        kernels.set_enabled(True)
        model = hetero.load("smollm2-135m", dtype=prec)
        prompt_short = model.prompt_ids(PROMPT)
        long_ids = eval_ids(model.tokenizer, tokens=a.prefill)
        same = hetero_decode(model, prompt_short, 32)[1] == hetero_decode(stock, prompt_short, 32)[1]
        del stock
        hetero_prefill(model, long_ids[:64])
        if llm is not None:
            llama_prefill(llm, long_ids[:64])
        hd, ld, hp, lp = [], [], [], []
        for _ in range(a.rounds):
            hd.append(hetero_decode(model, prompt_short, a.tokens)[0])
            hp.append(hetero_prefill(model, long_ids))
            if llm is not None:
                ld.append(llama_decode(llm, prompt_short, a.tokens))
                lp.append(llama_prefill(llm, long_ids))
        ppl_ids = eval_ids(model.tokenizer, tokens=a.ppl_tokens)
        hppl = window_ppl(hetero_logits(model), ppl_ids)
        lppl = window_ppl(llama_logits(llm), ppl_ids) if llm is not None else float("nan")
        bw_bound = STREAM_GBS * 1e9 / weight_bytes_per_token(model.net)
        gemm_bound = GEMM_GFLOPS * 1e9 * a.prefill / model.spec.prefill_flops(a.prefill)
        med = statistics.median

        def ratio(h, l):
            if not l:
                return "n/a"
            r = [x / y for x, y in zip(h, l)]
            return f"**{med(r):.2f}×** ({min(r):.2f}–{max(r):.2f})"
        print(f"| {prec} | {kind} | {med(hd):.1f} / {med(ld) if ld else float('nan'):.1f} | {ratio(hd, ld)} | "
              f"{100 * med(hd) / bw_bound:.0f}% of {bw_bound:.0f} | {med(hp):.0f} / {med(lp) if lp else float('nan'):.0f} | "
              f"{ratio(hp, lp)} | {100 * med(hp) / gemm_bound:.0f}% of {gemm_bound:.0f} | {hppl:.2f} / {lppl:.2f} | {same} |",
              flush=True)
        del model, llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
