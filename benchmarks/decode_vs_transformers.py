"""Decode speed: hetero vs transformers' generate() on the same GGUF, same dtype, side by side.

Both load the built-in SmolLM2-135M GGUF (transformers through
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`), run greedy decoding of the same prompt
for the same number of tokens (EOS ignored on both sides), and are timed per token. Rounds
alternate hetero and transformers so both see the same machine noise; the ratio is taken per round.

    .venv/bin/python benchmarks/decode_vs_transformers.py [--tokens 64] [--rounds 5] [--dtypes fp32,bf16]

Decode tok/s = (tokens - 1) / (time of last token - time of first token): prefill is excluded on
both sides. Prints a markdown table; exit code 1 when a target ratio (fp32 ≥ 2x, bf16 ≥ 1.3x) is missed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

TARGETS = {"fp32": 2.0, "bf16": 1.3}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = "Write a long story about a dragon who learns to cook."


def hetero_decode(model, prompt_ids: list[int], tokens: int) -> tuple[float, list[int]]:
    from hetero.runtime.generate import generate_step
    from hetero.runtime.sampling import Sampler, SamplingParams

    stamps, ids = [], []
    for tid, t in generate_step(model.net, prompt_ids, tokens, Sampler(SamplingParams()), stop_ids=set()):
        stamps.append(t)
        ids.append(tid)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), ids


def transformers_decode(ref, prompt_ids: list[int], tokens: int) -> tuple[float, list[int]]:
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t, self.calls = [], 0

        def put(self, value):  # first call is the prompt, then one call per new token
            self.calls += 1
            if self.calls > 1:
                self.t.append(time.perf_counter())

        def end(self):
            pass

    s = Stamps()
    with torch.inference_mode():
        out = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, streamer=s)
    return (len(s.t) - 1) / (s.t[-1] - s.t[0]), out[0, len(prompt_ids):].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    import hetero
    from hetero.model.sources import builtin_path
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = builtin_path("smollm2-135m")
    print(f"# decode: hetero vs transformers generate() — SmolLM2-135M ({path.name}), "
          f"{a.tokens} tokens, {a.rounds} alternating rounds, {a.threads} threads, torch {torch.__version__}\n")
    print("| dtype | hetero tok/s (median, min–max) | transformers tok/s (median, min–max) | ratio median (min–max) | target | tokens equal |")
    print("|---|---|---|---|---|---|")
    ok = True
    for dt in a.dtypes.split(","):
        model = hetero.load("smollm2-135m", dtype=dt)
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                   dtype=TORCH_DTYPES[dt]).eval()
        prompt = model.prompt_ids(PROMPT)
        hetero_decode(model, prompt, 8)            # warm-up both (first-call allocations, lazy init)
        transformers_decode(ref, prompt, 8)
        ours, theirs, ratios, same = [], [], [], True
        for _ in range(a.rounds):
            h, hid = hetero_decode(model, prompt, a.tokens)
            t, tid = transformers_decode(ref, prompt, a.tokens)
            ours.append(h), theirs.append(t), ratios.append(h / t)
            same = same and hid == tid
        med = statistics.median(ratios)
        ok = ok and med >= TARGETS.get(dt, 1.0)
        print(f"| {dt} | {statistics.median(ours):.1f} ({min(ours):.1f}–{max(ours):.1f}) "
              f"| {statistics.median(theirs):.1f} ({min(theirs):.1f}–{max(theirs):.1f}) "
              f"| **{med:.2f}×** ({min(ratios):.2f}–{max(ratios):.2f}) | ≥ {TARGETS.get(dt, 1.0)}× | {same} |",
              flush=True)
        del model, ref
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
