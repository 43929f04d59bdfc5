"""Builds the mutants, runs them in a worker subprocess, and classifies the results (shared by the
fuzz tests and benchmarks/fuzz.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402
import mutate  # noqa: E402


def run_worker(cases: list[dict], cache: Path, timeout: float) -> tuple[list[dict], int]:
    """Results per case and the worker's peak RSS; a worker killed mid-way marks the rest `hang`."""
    spec = cache / f"cases-{os.getpid()}-{len(cases)}.json"
    spec.write_text(json.dumps(cases))
    env = dict(os.environ, HETERO_CACHE=str(cache))
    try:
        p = subprocess.run([sys.executable, str(HERE / "worker.py"), str(spec)], capture_output=True, text=True,
                           env=env, timeout=timeout)
        out = p.stdout
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    peak = next((x["peak_rss_bytes"] for x in lines if "peak_rss_bytes" in x), -1)
    results = [x for x in lines if "outcome" in x]
    results += [{"outcome": "hang", "label": c.get("label", "")} for c in cases[len(results):]]
    return results, peak


def build_cases(root: Path, n_gguf: int, n_hf: int, seed: int) -> list[dict]:
    """Write the originals and mutants under `root`; each mutant is checked by `info`, then run if
    its spec passed (a broken chat template is run with the template)."""
    gguf_path = models.write_gguf(root / "tiny.gguf")
    hf_dir = models.write_hf(root / "tiny-hf")
    cases = [{"mode": "run", "path": str(gguf_path), "kind": "gguf", "chat": False, "label": "original gguf"},
             {"mode": "run", "path": str(gguf_path), "kind": "gguf", "chat": True, "label": "original gguf chat"},
             {"mode": "run", "path": str(hf_dir), "kind": "hf", "chat": False, "label": "original hf"}]
    orig = gguf_path.read_bytes()
    for i, (label, data) in enumerate(mutate.gguf_mutants(orig, n_gguf, seed)):
        p = root / f"g{i}.gguf"
        p.write_bytes(data)
        cases.append({"mode": "run", "path": str(p), "label": "gguf " + label, "kind": "gguf",
                      "chat": label.startswith("template")})
    for i in range(n_hf):
        d = root / f"h{i}"
        label = mutate.hf_mutant(hf_dir, d, i, seed)
        cases.append({"mode": "run", "path": str(d), "label": "hf " + label, "kind": "hf", "chat": False})
    return cases


ORIGINALS = 3


def classify(cases: list[dict], results: list[dict]) -> Counter:
    """Counts of refused (at info or at run) / same (ran, same greedy tokens as the original) /
    garbage (ran, other tokens) / bug (not a HeteroError) / hang; marks each bad result."""
    base = {(c["kind"], c["chat"]): r.get("tokens") for c, r in zip(cases[:ORIGINALS], results[:ORIGINALS])}
    counts: Counter = Counter()
    for c, r in zip(cases[ORIGINALS:], results[ORIGINALS:]):
        o = r["outcome"]
        if o == "error":
            o = f"refused at {r.get('stage', 'run')}"
        elif o == "ok":
            o = "same" if r.get("tokens") == base[(c["kind"], c["chat"])] else "garbage"
        counts[o] += 1
        r["bad"] = o in ("bug", "hang", "garbage")
    return counts
