"""Peers measured side by side with hetero, each in a process of its own, each only if installed.

    llama.cpp      llama-cpp-python on the model's GGUF (a GGUF source only)
    transformers   AutoModelForCausalLM in RAM (fp32 or bf16), eager
    accelerate     the same with device_map="auto", max_memory={"cpu": budget} and disk offload

Every peer gets the same seeded random prompt ids and decodes the same number of tokens, greedy,
fed token by token; decode tok/s is one over the median step (as hetero's), prefill tok/s is the
prompt over the time to the first logits. The footprint is measured as hetero's: peak RSS plus the
model's (and offload folder's) file pages in the page cache.

    python -m hetero.bench.peers '{"peer": "transformers", "model": ..., ...}'
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PEERS: tuple[str, ...] = ("llama.cpp", "transformers", "accelerate")
MODULE = {"llama.cpp": "llama_cpp", "transformers": "transformers", "accelerate": "accelerate"}


def missing(peer: str, model: str) -> str | None:
    """Why `peer` cannot run here for `model` (None when it can)."""
    if peer not in PEERS:
        return f"unknown peer {peer!r} (known: {', '.join(PEERS)})"
    for mod in {MODULE[peer], "transformers"} if peer == "accelerate" else {MODULE[peer]}:
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (make bench-peers installs it)"
    if peer == "llama.cpp":
        from hetero.model.sources import resolve

        if resolve(model).kind != "gguf":
            return "llama.cpp runs GGUF files; this model is not one"
    return None


def run_peers(peers: list[str], model: str, prompt_tokens: int, new_tokens: int, repeats: int,
              dtype: str = "bf16", budget: int | None = None, timeout: float = 1200.0) -> list[dict]:
    """One row per requested peer: its measurement, or {"peer", "skipped": why}."""
    out = []
    for peer in peers:
        why = missing(peer, model)
        if why:
            out.append({"peer": peer, "skipped": why})
            continue
        job = {"peer": peer, "model": model, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
               "repeats": repeats, "dtype": dtype, "budget": budget}
        try:
            p = subprocess.run([sys.executable, "-m", "hetero.bench.peers", json.dumps(job)],
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            out.append({"peer": peer, "skipped": f"no result within {timeout:.0f} s"})
            continue
        if p.returncode != 0:
            tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
            out.append({"peer": peer, "skipped": f"failed: {tail[:200]}"})
            continue
        out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


# ---- inside the peer's process -------------------------------------------------------------------

def _files(model: str):
    from hetero.runtime.engine import source_files
    from hetero.model.sources import resolve

    return source_files(resolve(model))


def _hf_model(model: str, dtype: str, budget: int | None, offload: str | None):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from hetero.model.sources import resolve

    hf_logging.set_verbosity_error()
    src = resolve(model)
    kw = {"dtype": torch.bfloat16 if dtype == "bf16" else torch.float32}
    if budget is not None:
        kw.update(device_map="auto", max_memory={"cpu": int(budget)}, offload_folder=offload,
                  offload_state_dict=True)
    if src.kind == "gguf":
        return AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name, **kw).eval()
    if src.kind == "synthetic":
        from hetero.model.synthetic import ensure_weights

        return AutoModelForCausalLM.from_pretrained(str(ensure_weights(src.name)), **kw).eval()
    return AutoModelForCausalLM.from_pretrained(str(src.path), **kw).eval()


def _time_hf(net, ids: list[int], N: int):
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = net(input_ids=torch.tensor([ids]), use_cache=True)
        ttft = time.perf_counter() - t0
        past, steps = out.past_key_values, []
        for i in range(N):
            t = time.perf_counter()
            out = net(input_ids=torch.tensor([[ids[i % len(ids)]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            out.logits[0, -1].argmax()
            steps.append(time.perf_counter() - t)
    return ttft, steps


def _time_llama_cpp(llm, ids: list[int], N: int):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    ttft = time.perf_counter() - t0
    steps = []
    for i in range(N):
        t = time.perf_counter()
        llm.eval([ids[i % len(ids)]])
        steps.append(time.perf_counter() - t)
    return ttft, steps


def measure_peer(job: dict) -> dict:
    import torch

    from hetero.bench.measure import Stat, prompt_ids
    from hetero.model.sources import resolve_spec
    from hetero.runtime.memory import Footprint

    peer, model = job["peer"], job["model"]
    P, N, R = job["prompt_tokens"], job["new_tokens"], job["repeats"]
    mon = Footprint(_files(model)).start()
    spec = resolve_spec(model)
    ids = prompt_ids(spec.vocab_size, P).tolist()[0]
    note = ""
    offload = None
    if peer == "llama.cpp":
        from llama_cpp import Llama

        llm = Llama(model_path=str(_files(model)[0]), n_ctx=P + N + 8, n_threads=torch.get_num_threads(),
                    n_batch=min(512, P), verbose=False)
        run = lambda: _time_llama_cpp(llm, ids, N)  # noqa: E731
        note = "GGUF as stored"
    else:
        budget = job.get("budget") if peer == "accelerate" else None
        if peer == "accelerate":
            offload = tempfile.mkdtemp(prefix="hetero-accelerate-")
        net = _hf_model(model, job.get("dtype", "bf16"), budget, offload)
        run = lambda: _time_hf(net, ids, N)  # noqa: E731
        note = f"{job.get('dtype', 'bf16')}" + (f", max_memory cpu={budget}, disk offload" if budget else ", in RAM")
    run()  # warm-up
    ttfts, pre, dec = [], [], []
    for _ in range(R):
        if offload:
            mon.files = list(mon.files) + [os.path.join(offload, f) for f in os.listdir(offload)]
        ttft, steps = run()
        ttfts.append(ttft)
        pre.append(P / ttft)
        dec.append(1.0 / statistics.median(steps))
    peak = mon.stop()
    return {"peer": peer, "note": note, "ttft_s": Stat.of(ttfts).__dict__, "prefill_tok_s": Stat.of(pre).__dict__,
            "decode_tok_s": Stat.of(dec).__dict__, "footprint_bytes": {"cpu": peak}}


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    print(json.dumps(measure_peer(json.loads(sys.argv[1]))))
