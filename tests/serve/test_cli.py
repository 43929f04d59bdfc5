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
        assert "Paris" in r.choices[0].message.content
        assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 24
        plan = httpx.get(url + "/plan", headers={"Authorization": "Bearer k"}).json()
        assert plan["model"]["name"] == "smollm2-135m" and len(plan["units"]) == 30 + 2
    finally:
        proc.terminate()
        proc.wait(20)
