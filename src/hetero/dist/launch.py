"""Start the ranks of a pipeline on this machine (what `hetero pipeline` and `hetero run --hosts` call),
or say how to start them under torchrun on several hosts.

Each rank is its own process (`python -m hetero.dist`, the same entry torchrun runs), so a rank can die
without taking the others down silently: the launcher watches them all, gives the survivors the
timeout to notice and exit with their own error, then kills whatever is left. Never a hang.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from hetero.dist.hosts import Hosts, hosts_to_dict
from hetero.dist.pipeline import Job
from hetero.errors import HeteroError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_commands(model: str, hosts: Hosts, hosts_file: str, extra: str = "") -> list[str]:
    """One torchrun line per host, in node-rank order (equal ranks per host, as torchrun requires)."""
    per = {h.ranks for h in hosts.hosts}
    if len(per) != 1:
        raise HeteroError("torchrun starts the same number of ranks on every node; give every host the same `ranks`")
    n = per.pop()
    q = shlex.quote  # single quotes: a pasted line never expands $(...) or backticks
    return [f"torchrun --nnodes {len(hosts.hosts)} --node-rank {i} --nproc-per-node {n} "
            f"--master-addr {q(hosts.master)} --master-port {hosts.port} -m hetero.dist {q(model)} "
            f"--hosts {q(hosts_file)}{' ' + extra if extra else ''}" for i in range(len(hosts.hosts))]


class LocalRun:
    """The rank processes of one pipeline run on this machine."""

    def __init__(self, model: str | None, hosts: Hosts, job: Job, timeout: float = 30.0, load_timeout: float = 600.0,
                 threads: int | None = None, env: dict | None = None, stream_stdout: bool = False):
        if not hosts.all_local():
            raise HeteroError("these hosts are not all on this machine; start each host's ranks with torchrun "
                              "(`hetero pipeline --print-torchrun` prints the commands)")
        self.hosts, self.timeout = hosts, timeout
        self.world = hosts.world_size
        self.dir = Path(tempfile.mkdtemp(prefix="hetero-dist-"))
        (self.dir / "hosts.json").write_text(json.dumps(hosts_to_dict(hosts)))
        (self.dir / "job.json").write_text(json.dumps(asdict(job)))
        self.out = self.dir / "result.json"
        threads = threads or max(1, (os.cpu_count() or 1) // self.world)
        port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.errs = [open(self.dir / f"rank{r}.err", "w+") for r in range(self.world)]
        for r in range(self.world):
            cmd = [sys.executable, "-m", "hetero.dist", *([model] if model else []),  # none: the built-in model
                   "--hosts", str(self.dir / "hosts.json"),
                   "--job", str(self.dir / "job.json"), "--timeout", str(timeout),
                   "--load-timeout", str(load_timeout), "--threads", str(threads)]
            if r == 0:
                cmd += ["--out", str(self.out)]
            e = {**os.environ, **(env or {}), "RANK": str(r), "WORLD_SIZE": str(self.world),
                 "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                 "OMP_NUM_THREADS": str(threads)}
            out = None if (stream_stdout and r == 0) else subprocess.DEVNULL
            self.procs.append(subprocess.Popen(cmd, env=e, stdout=out, stderr=self.errs[r]))

    def stderr(self, rank: int) -> str:
        self.errs[rank].flush()
        return (self.dir / f"rank{rank}.err").read_text()

    def wait(self, max_s: float | None = None) -> dict:
        """Wait for every rank; the result of rank 0, or one HeteroError naming what went wrong."""
        start = time.monotonic()
        first_fail = None
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if first_fail is None and any(c not in (None, 0) for c in codes):
                first_fail = now
            late = first_fail is not None and now - first_fail > self.timeout + 10
            if late or (max_s is not None and now - start > max_s):
                self.kill()
                for p in self.procs:
                    p.wait()
                break
            time.sleep(0.05)
        codes = [p.returncode for p in self.procs]
        try:
            if all(c == 0 for c in codes) and self.out.exists():
                return json.loads(self.out.read_text())
            raise HeteroError(self.failure(codes))
        finally:
            self.close()

    def failure(self, codes: list[int]) -> str:
        """One line: rank 0's own error when it has one (it names the culprit), else the first failing rank's."""
        lines = {}
        for r in range(self.world):
            errs = [ln[len("error: "):] for ln in self.stderr(r).splitlines() if ln.startswith("error: ")]
            if errs:
                lines[r] = errs[-1]
        status = ", ".join(f"rank {r}: " + ("ok" if c == 0 else f"killed by signal {-c}" if c < 0 else f"exit {c}")
                           for r, c in enumerate(codes))
        for r in sorted(lines, key=lambda r: (r != 0, r)):
            return f"{lines[r]} [{status}]"
        tail = next((self.stderr(r).strip().splitlines()[-1:] for r, c in enumerate(codes) if c), [""])
        return f"the pipeline failed [{status}] {tail[0][:300] if tail else ''}".strip()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)

    def close(self) -> None:
        for f in self.errs:
            f.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def spawn_local(model: str | None, hosts: Hosts, job: Job, timeout: float = 30.0, load_timeout: float = 600.0,
                threads: int | None = None, max_s: float | None = None, stream_stdout: bool = False) -> dict:
    """Run the whole pipeline on this machine and return rank 0's result (see pipeline._run)."""
    run = LocalRun(model, hosts, job, timeout, load_timeout, threads, stream_stdout=stream_stdout)
    return run.wait(max_s)
