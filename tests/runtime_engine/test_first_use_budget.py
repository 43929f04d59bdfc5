"""The first run of a model holds its budget as the tenth does: first-use artifacts (the machine's
profile, the GGUF spec and tokenizer, the tensor-cache conversion) are built in child processes,
so neither their temporaries nor a vocabulary conversion land in the run's peak or its reserve."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_a_fresh_cache_run_holds_a_tight_budget(tmp_path):
    # a wholly fresh cache: the machine's profile (~20 s, >1 GB of probes) is measured too, in a child
    env = {**os.environ, "HETERO_CACHE": str(tmp_path), "OMP_NUM_THREADS": "2"}
    budget = 450_000_000
    r = subprocess.run([sys.executable, "-m", "hetero.cli", "run", "smollm2-135m", "--memory", f"cpu={budget}",
                        "-n", "4", "-p", "hi", "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "reading the model's header and tokenizer once" in r.stderr  # built in a child, not here
    assert "measuring this machine's profile once" in r.stderr
    assert not out["over_budget"]
    assert out["measured"]["footprint_bytes"]["cpu"] <= budget * 1.05
    # what the first run left behind lets a second one skip every child
    r2 = subprocess.run([sys.executable, "-m", "hetero.cli", "run", "smollm2-135m", "--memory", f"cpu={budget}",
                         "-n", "4", "-p", "hi", "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0 and "once, in a child process" not in r2.stderr
    assert json.loads(r2.stdout.strip().splitlines()[-1])["token_ids"] == out["token_ids"]


def _peak_of_main_process(cmd: list[str], env: dict) -> tuple[int, str, int]:
    """(exit code, stderr, VmHWM bytes of the process itself: its children are not counted)."""
    import time

    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hwm = 0
    while p.poll() is None:
        try:
            for ln in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if ln.startswith("VmHWM:"):
                    hwm = max(hwm, int(ln.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.005)
    return p.returncode, p.stderr.read(), hwm


@pytest.mark.slow
def test_a_refused_run_stays_under_its_budget(tmp_path):
    session = Path(os.environ["HETERO_CACHE"])
    if (session / "profiles").is_dir():
        shutil.copytree(session / "profiles", tmp_path / "profiles")
    env = {**os.environ, "HETERO_CACHE": str(tmp_path)}
    budget = 150_000_000  # far below the runtime's own few hundred MB
    cmd = [sys.executable, "-m", "hetero.cli", "run", "smollm2-135m", "--memory", f"cpu={budget}", "-n", "2", "-p", "hi"]
    for _ in range(2):  # fresh (measured in a child), then from the cached measurement
        code, err, peak = _peak_of_main_process(cmd, env)
        assert code == 2 and "the runtime itself needs" in err.strip().splitlines()[-1], err[-1000:]
        assert 0 < peak < budget, peak
