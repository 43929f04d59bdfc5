"""Offload benchmark: does hetero run a Plan inside its budget, near the physical limit, ahead of peers?

    .venv/bin/python benchmarks/offload.py [--model synthetic:llama-1b] [--tokens 12] [--out FILE.json]

Every configuration runs in a fresh process, one after the other in this run (the machine is shared:
compare within a run). For each budget (--memory cpu=25%/50%/100% of the bf16 size) `hetero run`
plans (the whole process inside the budget), runs and reports its measured peak footprint (RSS + the
model's file pages in the page cache) and decode tok/s, with prefetch on and off. The bound for a
plan is 1 / max(bytes streamed per token / O_DIRECT bandwidth measured right after the run on the
same cache files, 1 / decode tok/s of the same units all held in RAM). Peers: transformers with the
weights in RAM (bf16) and accelerate with max_memory = the 25% budget and disk offload.
Also: greedy tokens of SmolLM2 under plans that differ only in residency (all RAM, half, all disk).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PROMPT = "Tell me a short story about a lighthouse keeper and the sea."


def hetero_run(args: list[str]) -> dict:
    cmd = [PY, "-m", "hetero.cli", "run", *args, "--json", "--no-chat", "-p", PROMPT]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def disk_bandwidth(plan: dict, model: str) -> float:
    """O_DIRECT read rate over the plan's streamed cache entries, as the streamer reads them (best of 3)."""
    import hetero
    from hetero.runtime.stream import HostBuffer, DirectReader
    from hetero.runtime.tensorcache import cache_root, entry_key, entry_path, read_entry

    spec = hetero.spec(model)
    files: list[tuple[Path, int, int]] = []  # (path, offset, bytes) of each streamed unit's entry
    for u in plan["units"]:
        if u["residency"] == "disk" and u["name"] != "embed":
            key = entry_key(spec, u["name"], u["precision"], u["device"])
            e = read_entry(entry_path(cache_root(), key), key)
            if e is not None:
                files.append((e.path, e.data_offset, e.data_bytes))
                continue
            # written by another code version (the key hashes the runtime's code): the newest file
            # of that unit streams the same bytes
            cands = sorted(entry_path(cache_root(), key).parent.glob(f"{u['name']}.{u['precision']}.*.bin"),
                           key=lambda f: f.stat().st_mtime)
            if cands:
                size = cands[-1].stat().st_size // 4096 * 4096
                files.append((cands[-1], 0, size))
    if not files:
        return 0.0
    buf = HostBuffer(max(n for _, _, n in files))
    best = 0.0
    for _ in range(3):
        t0, n = time.perf_counter(), 0
        for path, off, nbytes in files:
            r = DirectReader(path)
            r.read_into(buf.view, off, nbytes)
            r.close()
            n += nbytes
        best = max(best, n / (time.perf_counter() - t0))
    return best


def all_resident(plan: dict) -> dict:
    out = json.loads(json.dumps(plan))
    for u in out["units"]:
        u["residency"] = "resident"
    out["budgets"]["cpu"] = 1 << 40
    return out


PEER = r'''
import json, resource, sys, time, glob, os, tempfile
import torch
from hetero.runtime.memory import Footprint
d, mode, budget, n, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
files = glob.glob(os.path.join(d, "*.safetensors"))
mon = Footprint(files).start()
from transformers import AutoModelForCausalLM
off = tempfile.mkdtemp(prefix="hetero-offload-")
if mode == "accelerate":
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="auto",
        max_memory={"cpu": budget}, offload_folder=off, offload_state_dict=True)
else:
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
mon.files += glob.glob(os.path.join(off, "**", "*"), recursive=True)
ids = torch.tensor([[1] + [100 + i for i in range(15)]])
with torch.inference_mode():
    t0 = time.perf_counter(); m.generate(ids, max_new_tokens=1, do_sample=False); t1 = time.perf_counter()
    m.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n); t2 = time.perf_counter()
mon.stop()
print(json.dumps({"decode_tok_s": (n - 1) / max(1e-9, (t2 - t1) - (t1 - t0)), "footprint": mon.peak}))
'''


def peer(mode: str, model_dir: Path, budget: int, n: int) -> dict:
    r = subprocess.run([PY, "-c", PEER, str(model_dir), mode, str(budget), str(n), PROMPT],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def equivalence(tokens: int) -> dict:
    """SmolLM2: greedy tokens under all-RAM, half-on-disk and all-on-disk plans (same precision)."""
    sys.path.insert(0, str(ROOT / "tests" / "runtime_engine"))
    import hetero
    from helpers import everything, half, uniform_plan

    spec = hetero.spec("smollm2-135m")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, disk in (("all_ram", set()), ("half_disk", half(spec)), ("all_disk", everything(spec))):
            p = Path(tmp) / f"{name}.json"
            uniform_plan(spec, "bf16", disk, host="").save(p)
            d = hetero_run(["smollm2-135m", "--plan", str(p), "-n", str(tokens)])
            out[name] = d["token_ids"]
    out["identical"] = out["all_ram"] == out["half_disk"] == out["all_disk"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="synthetic:llama-1b")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--budgets", default="25,50,100")
    ap.add_argument("--out", default="")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-equivalence", action="store_true")
    a = ap.parse_args()
    import hetero
    from hetero.model.synthetic import ensure_weights

    spec = hetero.spec(a.model)
    bf16 = spec.total_bytes("bf16")
    res = {"model": a.model, "bf16_bytes": bf16, "tokens": a.tokens, "date": time.strftime("%Y-%m-%d %H:%M"),
           "ours": [], "peers": {}}
    if not a.skip_equivalence:
        res["equivalence"] = equivalence(a.tokens)
        print("equivalence:", res["equivalence"]["identical"], file=sys.stderr)
    n = str(a.tokens)
    for pct in [int(x) for x in a.budgets.split(",")]:
        row = {"budget_pct": pct}
        on = hetero_run([a.model, "--memory", f"cpu={pct}%", "-n", n])
        plan = on["plan"]
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "plan.json"
            p.write_text(json.dumps(plan))
            off = hetero_run([a.model, "--plan", str(p), "-n", n, "--no-prefetch"])
            p.write_text(json.dumps(all_resident(plan)))
            streams = any(u["residency"] == "disk" for u in plan["units"])
            ref = hetero_run([a.model, "--plan", str(p), "-n", n]) if streams else on
        bw = disk_bandwidth(plan, a.model)
        pass_bytes = sum(s["pass_bytes"] for s in on["streaming"])
        t_disk = pass_bytes / bw if bw else 0.0
        t_compute = 1.0 / ref["measured"]["decode_tok_s"]
        bound = 1.0 / max(t_disk, t_compute)
        budget = on["budget_bytes"]["cpu"]
        row.update({
            "budget_bytes": budget, "units": {f"{u['precision']}/{u['residency']}": 0 for u in plan["units"]},
            "predicted_decode_tok_s": on["predicted"]["decode_tok_s"],
            "prefetch_on": {"decode_tok_s": on["measured"]["decode_tok_s"], "footprint": on["measured"]["footprint_bytes"]["cpu"]},
            "prefetch_off": {"decode_tok_s": off["measured"]["decode_tok_s"], "footprint": off["measured"]["footprint_bytes"]["cpu"]},
            "stream_bytes_per_token": pass_bytes, "disk_bw": bw, "compute_tok_s": ref["measured"]["decode_tok_s"],
            "bound_tok_s": bound, "binds": "disk" if t_disk > t_compute else "compute",
        })
        for u in plan["units"]:
            row["units"][f"{u['precision']}/{u['residency']}"] += 1
        row["ratio_to_bound"] = row["prefetch_on"]["decode_tok_s"] / bound
        row["footprint_over_budget"] = row["prefetch_on"]["footprint"] / budget - 1
        res["ours"].append(row)
        print(json.dumps(row), file=sys.stderr)
    if not a.skip_peers and spec.format == "synthetic":
        d = ensure_weights(a.model.split(":", 1)[1])
        b25 = int(0.25 * bf16)
        res["peers"]["transformers_ram_bf16"] = peer("transformers", d, 0, a.tokens)
        print("transformers:", res["peers"]["transformers_ram_bf16"], file=sys.stderr)
        res["peers"]["accelerate_disk_25pct"] = peer("accelerate", d, b25, a.tokens)
        print("accelerate:", res["peers"]["accelerate_disk_25pct"], file=sys.stderr)
        try:
            import llama_cpp  # noqa: F401
            res["peers"]["llama_cpp"] = {"error": "installed, but no GGUF of this synthetic model"}
        except ImportError:
            res["peers"]["llama_cpp"] = {"error": "not installed (make bench-peers)"}
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
