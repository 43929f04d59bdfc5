"""`hetero serve` end to end: bad input exits 2 in one line; the real SmolLM2 answers a chat."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from .helpers import free_port

HETERO = str(Path(sys.executable).with_name("hetero"))


def test_port_in_use_is_one_line_exit_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([HETERO, "serve", "synthetic:tiny", "--port", str(port)], capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: cannot serve on 127.0.0.1:") and "Traceback" not in r.stderr


def test_bad_options_exit_2():
    r = subprocess.run([HETERO, "serve", "synthetic:tiny", "--max-concurrency", "0"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--max-concurrency" in r.stderr


@pytest.mark.parametrize("flags, words", [
    (["--dtype", "int4", "--precisions", "bf16"], "--dtype or --precisions"),
    (["--context", "1"], "--context"),
    (["--memory", "cpu=1MB"], "budget"),   # below what the runtime itself needs
    (["--memory", "cpu"], "DEVICE=SIZE"),
])
def test_bad_planning_flags_exit_2_in_one_line(flags, words):
    r = subprocess.run([HETERO, "serve", "synthetic:tiny", "--port", str(free_port()), *flags], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # warnings (e.g. a stale profile cache) may come before it
    assert last.startswith("error: ") and words in last, r.stderr


@pytest.mark.slow
def test_smollm2_chat_over_the_cli_server():
    port = free_port()
    proc = subprocess.Popen([HETERO, "serve", "smollm2-135m", "--port", str(port), "--api-key", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                h = httpx.get(url + "/health", timeout=30)
                if h.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=24,
                                      messages=[{"role": "user", "content": "What is the capital of France?"}])
        plan = httpx.get(url + "/plan", headers={"Authorization": "Bearer k"}).json()
        chosen = sorted({u.get("precision") for u in plan["units"]})  # named when the answer is wrong
        assert "Paris" in r.choices[0].message.content, (r.choices[0].message.content, chosen)
        assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 24
        assert plan["model"]["name"] == "smollm2-135m" and len(plan["units"]) == 30 + 2
    finally:
        proc.terminate()
        proc.wait(20)


def fresh_baseline() -> int:
    """The runtime baseline as a fresh process measures it (what a planned run reserves)."""
    code = "from hetero.runtime.baseline import runtime_baseline; print(runtime_baseline())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              timeout=300).stdout.strip())


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=30).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.5)


def test_serve_plans_as_run_does_and_answers_with_the_same_greedy_text(tmp_path):
    """`hetero serve --memory cpu=B` serves the Plan `hetero run --memory cpu=B` runs: same units, same
    budget, the same greedy reply to the same chat prompt, and the whole process inside the budget."""
    import json

    from hetero.hardware.inventory import inventory

    hw = tmp_path / "hw.json"
    hw.write_text(json.dumps(inventory().to_dict()))  # this machine's devices, no micro-benchmarks needed
    budget = fresh_baseline() + 150 * 10**6
    flags = ["--memory", f"cpu={budget}", "--hardware", str(hw), "--context", "256"]
    prompt = "Name a river."
    ran = subprocess.run([sys.executable, "-m", "hetero.cli", "run", "synthetic:tiny", *flags, "-p", prompt,
                          "-n", "8", "--chat", "--json"], capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    run = json.loads(ran.stdout)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hetero.cli", "serve", "synthetic:tiny", *flags,
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        plan = httpx.get(url + "/plan").json()
        assert plan["budgets"]["cpu"] == budget and plan["workload"]["context"] == 256

        def placement(p):
            return [(u["name"], u["device"], u["precision"], u["residency"]) for u in p["units"]]

        assert placement(plan) == placement(run["plan"])
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="synthetic:tiny", temperature=0, max_tokens=8,
                                      messages=[{"role": "user", "content": prompt}])
        assert r.choices[0].message.content == run["text"] and r.usage.completion_tokens == 8
        rep = httpx.get(url + "/report").json()
        assert rep["budget_bytes"]["cpu"] == budget
        assert rep["over_budget"] == {} and rep["measured"]["footprint_bytes"]["cpu"] <= budget * 1.05
        # a request past the planned context is refused: its KV cache is not in the budget
        too_long = httpx.post(url + "/v1/completions", json={"model": "synthetic:tiny", "prompt": "x" * 200,
                                                              "max_tokens": 100})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "plan: " in out and "cpu/" in out  # the startup line shows the plan's summary
