"""Hostile input at scale: thousands of mutated model files (GGUF and safetensors/config.json), a
hundred-odd bad CLI invocations and a few hundred bad HTTP requests, each classified.

    PYTHONPATH=src .venv/bin/python benchmarks/fuzz.py --models 3000 --seed 1

Must show 0 for: tracebacks (bug), hangs, workers over 2 GB RSS, and garbage (a mutated file that
runs with exit 0 but answers other greedy tokens than the original); 0 x 5xx over the requests,
with /health and the greedy answer unchanged after each group. Models are tiny synthetic ones
written to a temp dir (tests/fuzz/models.py), so a case takes milliseconds.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402

RSS_CAP = 2 << 30


def model_group(root: Path, n: int, seed: int, batch: int = 500) -> dict:
    """`n` mutants, half GGUF and half HF, run in workers of `batch` cases under a 3 GB address cap."""
    cases = harness.build_cases(root, n // 2, n - n // 2, seed)
    originals, mutants = cases[:harness.ORIGINALS], cases[harness.ORIGINALS:]
    counts: Counter = Counter()
    peaks, bad = [], []
    for i in range(0, len(mutants), batch):
        chunk = originals + mutants[i:i + batch]
        for c in chunk:
            c["as_limit"] = 3 << 30
        cache = root / f"cache{i}"
        cache.mkdir()
        results, peak = harness.run_worker(chunk, cache, timeout=60 + 2 * len(chunk))
        peaks.append(peak)
        base = [r.get("tokens") for r in results[:harness.ORIGINALS]]
        print(json.dumps({"chunk": i, "originals": base, "peak_mb": round(peak / 1e6)}), file=sys.stderr, flush=True)
        counts += harness.classify(chunk, results)
        bad += [(c["label"], r) for c, r in zip(chunk, results) if r.get("bad")]
    counts["over 2 GB"] = sum(p > RSS_CAP or p < 0 for p in peaks)
    return {"counts": dict(counts), "peak_rss_mb": round(max(peaks) / 1e6), "bad": bad[:30],
            "gguf": sum("gguf" == c["kind"] for c in mutants), "hf": sum("hf" == c["kind"] for c in mutants)}


def cli_cases(root: Path) -> list[list[str]]:
    """Bad invocations: numbers out of range, odd paths, bad files, unknown names."""
    (root / "list.json").write_text("[1, 2]")
    (root / "neg.json").write_text(json.dumps({"version": 1, "units": [], "model": {"name": "x"},
                                               "budgets": {"cpu": -1}}))
    (root / "bin.yaml").write_bytes(bytes(range(256)) * 8)
    (root / "tag.yaml").write_text("hosts: !!python/object/apply:os.system ['true']\n")
    (root / "afile").write_text("x")
    m = "synthetic:tiny"
    import os

    os.mkfifo(root / "fifo")
    # Never a real device as an output path: a broken check would replace it (as root, /dev/null).
    paths = ["/proc/hetero-x", str(root / "fifo"), str(root), str(root / "none" / "x"), str(root / "afile")]
    out: list[list[str]] = []
    for n in ("-1", "0", "99999999999999999999", "nan", "1e309", "abc"):
        out += [["run", m, "--max-new-tokens", n], ["run", m, "-n", "1", "--threads", n],
                ["run", m, "-n", "1", "--temperature", n], ["run", m, "-n", "1", "--top-p", n],
                ["plan", m, "--max-quality-loss", n], ["plan", m, "--context", n], ["plan", m, "--batch", n],
                ["plan", m, "--prompt-tokens", n], ["bench", m, "--repeats", n],
                ["pipeline", m, "--ranks", n]]
    for p in paths:
        out += [["plan", m, "-o", p], ["run", p, "-n", "1"], ["info", p], ["run", m, "-n", "1", "--plan", p],
                ["plan", m, "--hardware", p], ["bench", m, "--report", p], ["compress", m, "--method", "int8",
                                                                             "-o", p, "--force"],
                ["pipeline", m, "--hosts", p], ["plan", m, "--sensitivity", p]]
    for mem in ("cpu=-1GB", "cpu=abc", "gpu7=1GB", "cpu=1e400GB", "cpu=0", "cpu=200%", "=", "cpu"):
        out += [["plan", m, "--memory", mem], ["run", m, "-n", "1", "--memory", mem]]
    for dev in ("/dev/null", "/dev/zero"):  # read only
        out += [["run", dev, "-n", "1"], ["info", dev], ["run", m, "-n", "1", "--plan", dev],
                ["plan", m, "--hardware", dev], ["pipeline", m, "--hosts", dev], ["plan", m, "--sensitivity", dev]]
    out += [["run", m, "-n", "1", "--plan", str(root / "list.json")],
            ["run", m, "-n", "1", "--plan", str(root / "neg.json")],
            ["pipeline", m, "--hosts", str(root / "bin.yaml")], ["pipeline", m, "--hosts", str(root / "tag.yaml")],
            ["pipeline"], ["pipeline", m, "--ranks", "6"], ["compress", m, "--method", "int8", "-o", ".", "--force"],
            ["compress", m, "--method", "nope", "-o", str(root / "c")], ["run", "synthetic:nope"],
            ["run", m, "--dtype", "int3"], ["plan", m, "--precisions", "fp7"], ["plan", m, "--objective", "fast"],
            ["plan", m, "--hardware", "catalog:nonsense"], ["run", "", "-n", "1"], ["info", "synthetic:"]]
    return out


def cli_group(root: Path, timeout_per: int = 60) -> dict:
    cases = [{"mode": "cli", "args": a, "label": " ".join(a), "timeout": timeout_per} for a in cli_cases(root)]
    for c in cases:
        c["as_limit"] = 6 << 30
    cache = root / "cli-cache"
    cache.mkdir()
    counts: Counter = Counter()
    bad, peaks, accepted = [], [], []
    for i in range(0, len(cases), 30):
        chunk = cases[i:i + 30]
        results, peak = harness.run_worker(chunk, cache, timeout=timeout_per * len(chunk))
        peaks.append(peak)
        for c, r in zip(chunk, results):
            counts[r["outcome"]] += 1
            if r["outcome"] in ("bug", "hang"):
                bad.append((c["label"], r.get("msg", "")))
            elif r["outcome"] == "ok":
                accepted.append(c["label"])
    counts["over 2 GB"] = sum(p > RSS_CAP or p < 0 for p in peaks)
    return {"counts": dict(counts), "n": len(cases), "bad": bad[:10], "accepted": accepted,
            "peak_rss_mb": round(max(peaks) / 1e6)}


# ---- HTTP -----------------------------------------------------------------------------------------

def _bodies() -> list[tuple[str, bytes]]:
    base = {"model": "synthetic:tiny", "prompt": "hello", "max_tokens": 2}
    chat = {"model": "synthetic:tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    out = []
    weird = [None, -1, 0, 2**63, 1e309, "x", "", [], {}, [[]], True, "\ud800", {"a": {"b": [1]}}, 1.5]
    for key in ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                "stream_options", "n", "logprobs"):
        for v in weird:
            try:
                out.append(("/v1/completions", json.dumps({**base, key: v}).encode()))
            except ValueError:
                out.append(("/v1/completions", (json.dumps(base)[:-1] + f', "{key}": 1e999}}').encode()))
    for key in ("messages", "model"):
        for v in weird:
            out.append(("/v1/chat/completions", json.dumps({**chat, key: v}, allow_nan=True).encode()))
    for msg in ({"role": "user"}, {"content": "x"}, {"role": "user", "content": "\ud800"},
                {"role": "wizard", "content": "x"}, {"role": "user", "content": [{"type": "text"}]}, "x", None):
        out.append(("/v1/chat/completions", json.dumps({**chat, "messages": [msg]}).encode()))
    out += [("/v1/completions", b"[" * n + b"]" * n) for n in (100, 1000, 100000)]
    out += [("/v1/completions", b'{"a":' * 5000 + b"1" + b"}" * 5000), ("/v1/completions", b"\xff\xfe"),
            ("/v1/completions", b""), ("/v1/completions", b"null"), ("/v1/completions", b'"str"'),
            ("/v1/completions", b'{"model": "synthetic:tiny", "prompt": "\\ud800"}'),
            ("/v1/completions", b'{"model": "synthetic:tiny", "prompt": "x' + b"y" * 2_000_000 + b'"}')]
    return out


def _request(port: int, raw: bytes, timeout: float = 30.0) -> int:
    """Send one raw HTTP request; the status code, or 0 when no answer came."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        buf = b""
        try:
            while b"\r\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        except socket.timeout:
            return 0
    try:
        return int(buf.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def _post(path: str, body: bytes, auth: bytes = b"Bearer k1", length: int | None = None,
          ctype: bytes = b"application/json") -> bytes:
    n = len(body) if length is None else length
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype + b"\r\nAuthorization: "
            + auth + b"\r\nContent-Length: " + str(n).encode() + b"\r\nConnection: close\r\n\r\n" + body)


def http_group() -> dict:
    import hetero
    from hetero.serve.app import create_app
    from hetero.serve.limits import RequestLimits
    from tests.serve.helpers import Server

    model = hetero.load("synthetic:tiny")
    app = create_app(model, api_key="k1")
    app.add_middleware(RequestLimits, api_key="k1", idle_s=1.0)  # the wiring create_app is to get
    good = json.dumps({"model": "synthetic:tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}).encode()
    groups = {
        "bodies": [_post(p, b) for p, b in _bodies()],
        "headers": [_post("/v1/completions", good, auth=a) for a in (b"k1", b"Basic k1", b"Bearer", b"Bearer k2",
                                                                    b"bearer k1x", b"\xff")]
        + [_post("/v1/completions", good, ctype=c) for c in (b"text/plain", b"", b"application/json; charset=x")]
        + [_post("/v1/completions", good[:10], length=len(good)), _post("/v1/completions", b"", length=10**6),
           _post("/v1/completions", good, length=2**63)],
        "paths": [m + b" " + p + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\nConnection: close\r\n\r\n"
                  for m in (b"GET", b"DELETE", b"PUT") for p in (b"/v1/completions", b"/v1/models/%2e%2e%2fetc",
                                                                  b"/../../etc/passwd", b"/v1/models/" + b"a" * 5000,
                                                                  b"/nope")],
    }
    counts: Counter = Counter()
    checks = []
    with Server(app) as srv:
        answer = None
        for name, reqs in groups.items():
            for raw in reqs:
                code = _request(srv.port, raw)
                counts["5xx" if code >= 500 else "4xx" if code >= 400 else "no answer" if code == 0 else "2xx/3xx"] += 1
            import httpx

            h = httpx.get(srv.url + "/health", timeout=30).json()
            r = httpx.post(srv.url + "/v1/completions", content=good, timeout=30,
                           headers={"Authorization": "Bearer k1", "Content-Type": "application/json"}).json()
            text = r["choices"][0]["text"]
            answer = text if answer is None else answer
            checks.append({"group": name, "n": len(reqs), "health": h["status"], "same_answer": text == answer})
    return {"counts": dict(counts), "n": sum(len(r) for r in groups.values()), "after_each_group": checks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma list of groups to skip: models,cli,http")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    out = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="hetero-fuzz-") as tmp:
        root = Path(tmp)
        if "models" not in skip:
            (root / "m").mkdir()
            out["models"] = model_group(root / "m", a.models, a.seed)
            print(json.dumps({"models": out["models"]}), flush=True)
        if "cli" not in skip:
            (root / "c").mkdir()
            out["cli"] = cli_group(root / "c")
            print(json.dumps({"cli": out["cli"]}), flush=True)
        if "http" not in skip:
            out["http"] = http_group()
            print(json.dumps({"http": out["http"]}), flush=True)
    out["seconds"] = round(time.time() - t0)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
