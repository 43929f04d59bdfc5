"""Same-file comparisons with llama.cpp: speed at a real shape, perplexity of the built-in model.

Speed (`vs_llamacpp.py --shape NAME`): synthetic:NAME is written by `hetero compress` as Q8_0 and
Q4_0 GGUF files, and llama.cpp's own quantizer makes a Q4_K_M from the Q8_0 (all cached under
cache_dir()/bench-files). Both engines then run the *same file*, alternated A B A B per round: one
prompt of --prompt tokens (prefill = prompt / time to the first token), then --decode greedy steps.

Perplexity (`--perplexity`): the built-in SmolLM2 as Q8_0 and Q4_0 (hetero compress), Q4_K_M
(llama.cpp's quantizer from an exact F32 widening of the shipped file) and the shipped Q4_1; each
file is scored by hetero.eval.perplexity, with llama.cpp behind the same call, so both see the same
windows, context, stride and scoring.
"""
from __future__ import annotations

import ctypes
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PPL_CONTEXT, PPL_STRIDE = 512, 256   # hetero eval's defaults
# hetero's precision for each file type while `native` (run the file's own types) is not available
FALLBACK = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4", "Q4_K_M": "int4", "Q4_K_S": "int4", "F32": "fp32"}


# ---- files -------------------------------------------------------------------------------------
def files_dir(kind: str) -> Path:
    from hetero.model.synthetic import GENERATOR
    from hetero.paths import cache_dir

    d = cache_dir() / "bench-files" / f"{kind}.g{GENERATOR}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def hetero_compress(model: str, qtype: str, out: Path) -> Path:
    """`hetero compress MODEL --format gguf --type QTYPE -o OUT`, once (it writes a temp file, then renames)."""
    if not out.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hetero.cli", "compress", model, "--format", "gguf",
                        "--type", qtype, "-o", str(out)], check=True)
        print(f"<!-- wrote {out.name} with hetero compress in {time.perf_counter() - t:.0f} s -->", flush=True)
    return out


def llama_quantize(src: Path, out: Path, kind: str) -> Path:
    """llama.cpp's own quantizer: SRC -> OUT of `kind` (Q4_K_M, Q4_K_S, Q8_0, BF16, F32), once."""
    import llama_cpp

    if out.exists():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q4_K_M": 15, "Q4_K_S": 14, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
                    "BF16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16, "F32": llama_cpp.LLAMA_FTYPE_ALL_F32}[kind]
    params.allow_requantize = True
    tmp = out.with_name(f".{out.name}.tmp")
    t = time.perf_counter()
    saved = os.dup(2)  # the quantizer prints every tensor on stderr
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"llama.cpp could not make {kind} from {src} (rc {rc})")
    os.replace(tmp, out)
    print(f"<!-- wrote {out.name} with llama.cpp's quantizer in {time.perf_counter() - t:.0f} s -->", flush=True)
    return out


def shape_files(shape: str, kquant: str) -> list[tuple[str, Path]]:
    d = files_dir(shape)
    q8 = hetero_compress(f"synthetic:{shape}", "Q8_0", d / f"{shape}.Q8_0.gguf")
    q4 = hetero_compress(f"synthetic:{shape}", "Q4_0", d / f"{shape}.Q4_0.gguf")
    return [("Q8_0", q8), ("Q4_0", q4), (kquant, llama_quantize(q8, d / f"{shape}.{kquant}.gguf", kquant))]


def ppl_files(kquant: str) -> list[tuple[str, Path]]:
    from hetero.model.sources import builtin_path

    src = builtin_path("smollm2-135m")
    d = files_dir("smollm2-135m")
    f32 = llama_quantize(src, d / "smollm2-135m.F32.gguf", "F32")  # exact: every Q4_1 value fits F32
    return [("Q8_0", hetero_compress("smollm2-135m", "Q8_0", d / "smollm2-135m.Q8_0.gguf")),
            ("Q4_0", hetero_compress("smollm2-135m", "Q4_0", d / "smollm2-135m.Q4_0.gguf")),
            (kquant, llama_quantize(f32, d / f"smollm2-135m.{kquant}.gguf", kquant)),
            ("Q4_1", src)]


# ---- engines -----------------------------------------------------------------------------------
def load_hetero(path: Path, want: str, kind: str, threads: int):
    """hetero on `path` at precision `want`; `native` falls back to FALLBACK[kind] until it exists."""
    import hetero
    from hetero.errors import HeteroError

    try:
        return hetero.load(str(path), dtype=want, threads=threads), want
    except HeteroError as e:
        if want != "native" or "unknown dtype" not in str(e):
            raise
    ran = FALLBACK[kind]
    return hetero.load(str(path), dtype=ran, threads=threads), f"{ran} (native n/a)"


def load_llama(path: Path, threads: int, n_ctx: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                 logits_all=logits_all, verbose=False)


def hetero_run(model, prompt: list[int], steps: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one greedy generation after `prompt`."""
    from hetero.runtime.generate import generate_step
    from hetero.runtime.sampling import Sampler, SamplingParams

    st = [t for _, t in generate_step(model.net, prompt, steps, Sampler(SamplingParams()), stop_ids=set())]
    return len(prompt) / st[0], (len(st) - 1) / (st[-1] - st[0])


def llama_run(llm, prompt: list[int], steps: int) -> tuple[float, float]:
    llm.reset()  # no prefix reuse between rounds
    t0 = time.perf_counter()
    st = []
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        st.append(time.perf_counter())
        if len(st) >= steps:
            break
    return len(prompt) / (st[0] - t0), (len(st) - 1) / (st[-1] - st[0])


class LlamaNet:
    """llama.cpp behind the call hetero.eval.perplexity makes: net(ids [1, T], 0, cache) -> [1, T, V]."""

    def __init__(self, llm):
        self.llm = llm

    def new_cache(self, batch: int, length: int):
        return None

    def __call__(self, ids, pos, cache, last_only=False):
        import numpy as np

        w = ids[0].tolist()
        self.llm.reset()
        self.llm.eval(w)
        return torch.from_numpy(np.array(self.llm.scores[:len(w)], dtype=np.float32))[None]


# ---- what a token costs ------------------------------------------------------------------------
def file_bytes_per_token(path: Path) -> int:
    """Tensor bytes llama.cpp reads per decoded token: all but the embedding table (a row lookup),
    unless the head is tied to it."""
    from hetero.model.gguf_index import tensor_table

    t = tensor_table(path)
    skip = "token_embd.weight" if "output.weight" in t else None
    return sum(e.nbytes for n, e in t.items() if n != skip)


def hetero_bytes_per_token(model) -> int:
    """Weight bytes hetero reads per decoded token: every parameter buffer once, but the embedding
    table only when the head is tied to it."""
    seen, total = set(), 0
    for name, mod in model.net.named_modules():
        if (name == "embed" or name.startswith("embed.")) and not model.spec.tie_embeddings:
            continue
        for attr in ("weight", "qweight", "packed", "scales", "scales_zeros", "bias", "data"):
            t = getattr(mod, attr, None)
            if isinstance(t, torch.Tensor) and mod is not model.net and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def machine_peaks() -> tuple[float, float, str, str]:
    """(memory read B/s, best GEMM FLOP/s, its precision, when measured) from this machine's hardware
    profile (a profile measured on a busy machine understates both: the time says which one it is)."""
    from hetero.hardware.profile import get_profile_isolated

    prof = get_profile_isolated()
    cpu = prof.devices["cpu"]
    prec, m = max(((p, v) for p, v in cpu.gemm_flops.items() if p in ("int8", "bf16")), key=lambda pv: pv[1].median)
    read = cpu.mem_read_bandwidth or cpu.mem_bandwidth
    return read.median, m.median, prec, prof.measured_at


# ---- the two tables ----------------------------------------------------------------------------
def _ratio(h: list[float], l: list[float]) -> str:
    r = [x / y for x, y in zip(h, l)]
    return f"**{statistics.median(r):.2f}×** ({min(r):.2f}–{max(r):.2f})"


def speed_table(shape: str, want: str, rounds: int, prompt_n: int, steps: int, threads: int, kquant: str,
                acts: list[str] | None = None) -> None:
    from hetero.model.sources import resolve_spec

    files_speed_table(f"synthetic:{shape}", resolve_spec(f"synthetic:{shape}"), shape_files(shape, kquant),
                      want, rounds, prompt_n, steps, threads, acts)


def file_speed_table(model: str, want: str, rounds: int, prompt_n: int, steps: int, threads: int,
                     acts: list[str] | None = None) -> None:
    """The same table for one GGUF a user has (a path, or a built-in name such as gemma3-270m)."""
    from hetero.model.sources import resolve, resolve_spec

    path = Path(resolve(model).path)
    files_speed_table(model, resolve_spec(model), [(path.stem, path)], want, rounds, prompt_n, steps, threads, acts)


def files_speed_table(name: str, spec, files: list[tuple[str, Path]], want: str, rounds: int, prompt_n: int,
                      steps: int, threads: int, acts: list[str] | None = None) -> None:
    """acts: hetero's decode activation modes (kernels.set_decode_act), each run in every round
    beside llama.cpp (llama.cpp, then each mode), one row per mode."""
    from hetero.eval.corpus import eval_ids
    from hetero.ops import kernels

    import llama_cpp

    read_bs, gemm, gemm_prec, measured_at = machine_peaks()
    flops_tok = spec.prefill_flops(prompt_n) / prompt_n
    shape = name
    print(f"# hetero vs llama.cpp on the same GGUF files — {shape} ({spec.n_layers} layers, hidden "
          f"{spec.hidden_size}, FFN {spec.intermediate_size}, vocab {spec.vocab_size}), {threads} threads, "
          f"prompt {prompt_n} tokens, {steps} decode steps, {rounds} rounds A B A B, medians; torch "
          f"{torch.__version__}, llama-cpp-python {llama_cpp.__version__}\n")
    print(f"Memory read rate {read_bs / 1e9:.1f} GB/s and best GEMM {gemm / 1e9:.0f} GFLOP/s ({gemm_prec}) from "
          f"this machine's hardware profile (measured {measured_at}); % bound = measured / (that rate / "
          f"bytes or FLOPs per token).\n")
    print("| file | hetero precision | decode tok/s hetero / llama.cpp | decode ratio (min–max) | "
          "decode % of memory bound hetero / llama.cpp | prefill tok/s hetero / llama.cpp | "
          "prefill ratio (min–max) | prefill % of GEMM peak hetero / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    med = statistics.median
    start_act = kernels.decode_act()
    acts = acts or [start_act]
    for kind, path in files:
        model, ran = load_hetero(path, want, kind, threads)
        llm = load_llama(path, threads, n_ctx=prompt_n + steps + 16)
        prompt = eval_ids(model.tokenizer, tokens=prompt_n)
        assert len(prompt) == prompt_n, f"the corpus gives {len(prompt)} tokens"
        hetero_run(model, prompt[:64], 4), llama_run(llm, prompt[:64], 4)  # warm both
        h: dict[str, list] = {a: [] for a in acts}
        l = []
        try:
            for _ in range(rounds):
                l.append(llama_run(llm, prompt, steps))
                for a in acts:
                    kernels.set_decode_act(a)
                    h[a].append(hetero_run(model, prompt, steps))
        finally:
            kernels.set_decode_act(start_act)
        ld, lp = [x[1] for x in l], [x[0] for x in l]
        hb, lb = hetero_bytes_per_token(model), file_bytes_per_token(path)
        for a in acts:
            hd, hp = [x[1] for x in h[a]], [x[0] for x in h[a]]
            label = ran + (f", x {a} in decode" if len(acts) > 1 or a != "bf16" else "")
            print(f"| {path.name} | {label} | {med(hd):.1f} / {med(ld):.1f} | {_ratio(hd, ld)} | "
                  f"{100 * med(hd) * hb / read_bs:.0f}% ({hb / 1e6:.0f} MB/tok) / "
                  f"{100 * med(ld) * lb / read_bs:.0f}% ({lb / 1e6:.0f} MB/tok) | {med(hp):.1f} / {med(lp):.1f} | "
                  f"{_ratio(hp, lp)} | {100 * med(hp) * flops_tok / gemm:.0f}% / "
                  f"{100 * med(lp) * flops_tok / gemm:.0f}% |", flush=True)
        del model, llm


def perplexity_table(want: str, tokens: int, threads: int, kquant: str) -> None:
    from hetero.compress.core import build_net
    from hetero.eval.corpus import BUILTIN_NAME, eval_ids
    from hetero.eval.perplexity import perplexity
    from hetero.model.sources import resolve, resolve_spec
    from hetero.model.spec import expected_tensors
    from hetero.model.weights import WeightStore, required

    files = ppl_files(kquant)
    print(f"# Perplexity on the same GGUF files — built-in SmolLM2-135M, {tokens} tokens of the built-in "
          f"{BUILTIN_NAME} corpus, context {PPL_CONTEXT}, stride {PPL_STRIDE}, one evaluator "
          f"(hetero.eval.perplexity) for both engines\n")
    print("| file | made by | hetero precision | ppl hetero | ppl hetero fp32 (the file's values) | ppl llama.cpp |")
    print("|---|---|---|---|---|---|")
    made = {"Q8_0": "hetero compress", "Q4_0": "hetero compress", "Q4_1": "shipped",
            kquant: "llama.cpp quantize (from F32)"}
    for kind, path in files:
        model, ran = load_hetero(path, want, kind, threads)
        ids = eval_ids(model.tokenizer, tokens=tokens)
        h = perplexity(model.net, ids, PPL_CONTEXT, PPL_STRIDE, progress=False).perplexity
        spec = resolve_spec(str(path))
        get = required(WeightStore(resolve(str(path)), spec))
        exact = perplexity(build_net(spec, {n: get(n).float() for n, _ in expected_tensors(spec)}), ids,
                           PPL_CONTEXT, PPL_STRIDE, progress=False).perplexity
        llm = load_llama(path, threads, n_ctx=PPL_CONTEXT, logits_all=True)
        lc = perplexity(LlamaNet(llm), ids, PPL_CONTEXT, PPL_STRIDE, progress=False).perplexity
        print(f"| {path.name} | {made[kind]} | {ran} | {h:.3f} | {exact:.3f} | {lc:.3f} |", flush=True)
        del model, llm
