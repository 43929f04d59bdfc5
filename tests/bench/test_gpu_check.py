"""benchmarks/gpu_check.sh --dry-run: the GPU check's arguments, steps and output format, without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)


def test_dry_run_writes_the_report(tmp_path):
    r = run("--dry-run", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((tmp_path / "gpu_check.json").read_text())  # $OUT/gpu_check.json by default
    assert d["schema"] == 1 and d["dry_run"] is True and d["model"] == "synthetic:llama-1b"
    assert d["pytest"]["rc"] == -1
    fractions = [row["fraction"] for row in d["curve"]]
    assert fractions == [0.0, 0.25, 0.5, 0.75, 1.0]
    gpu_layers = [row["gpu_layers"] for row in d["curve"]]
    assert gpu_layers[0] == 0 and gpu_layers[-1] == d["curve"][0]["layers"] == 22
    assert gpu_layers == sorted(gpu_layers)
    gpu_mem = [row["predicted"]["memory_bytes"].get("cuda:0", 0) for row in d["curve"]]
    assert gpu_mem[0] == 0 and all(a < b for a, b in zip(gpu_mem, gpu_mem[1:]))
    # more of the model on an H200 is faster, and every plan keeps the CUDA reserve
    decode = [row["predicted"]["decode_tok_s"] for row in d["curve"]]
    assert all(a < b for a, b in zip(decode, decode[1:]))
    assert all(row["predicted"]["reserve_bytes"]["cuda:0"] == d["reserve"]["cuda_reserve_bytes"] for row in d["curve"])
    assert all(row["measured"] is None for row in d["curve"])
    # the measuring code ran on the tiny model with CUDA simulated
    assert [row["fraction"] for row in d["plumbing"]] == fractions
    assert all(row["measured"]["decode_tok_s"] > 0 and row["measured"]["prefill_tok_s"] > 0 for row in d["plumbing"])


def test_out_path_and_bad_arguments(tmp_path):
    out = tmp_path / "sub" / "x.json"
    assert run("--dry-run", "--out", str(out), tmp_path=tmp_path).returncode == 0
    assert json.loads(out.read_text())["curve"]
    r = run("--frobnicate", tmp_path=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown argument" in r.stderr
    r = run("--profile", "full", tmp_path=tmp_path)
    assert r.returncode == 2 and "--profile must be quick or none" in r.stderr
