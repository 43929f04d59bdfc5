"""Point-to-point messages between pipeline ranks, with failures turned into one clear error.

torch.distributed does the transport (gloo on CPU, nccl on GPU); this adds what a pipeline needs:
every blocking receive is bounded by the process group's timeout (gloo raises on its own), a peer
that dies is named (the first rank to notice writes the culprit into the rendezvous store, so ranks
further down a chain of failures blame the right one), and a watchdog thread ends the process if the
main thread makes no progress for longer than the timeout — a run may fail, never hang.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque

import torch
import torch.distributed as dist

from hetero.errors import HeteroError

_BLAME_KEY = "hetero/dist/failed"
_WIRE = {torch.float32: (0, torch.float32), torch.bfloat16: (1, torch.int16), torch.float16: (2, torch.int16),
         torch.int64: (3, torch.int64)}
_FROM_CODE = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16, 3: torch.int64}


class RankFailure(HeteroError):
    """Another rank died or stalled; the message names it."""


class Watchdog:
    """Ends the process (exit 2, one line on stderr) when `beat()` is not called for `limit` seconds."""

    def __init__(self, rank: int, limit: float):
        self.rank, self.limit, self.last = rank, limit, time.monotonic()
        self.what = "starting"
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="hetero-watchdog", daemon=True)
        self._t.start()

    def beat(self, what: str | None = None, limit: float | None = None) -> None:
        self.last = time.monotonic()
        if what is not None:
            self.what = what
        if limit is not None:
            self.limit = limit

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            idle = time.monotonic() - self.last
            if idle > self.limit:
                print(f"error: rank {self.rank}: no progress for {idle:.0f} s while {self.what} "
                      f"(watchdog limit {self.limit:g} s)", file=sys.stderr, flush=True)
                os._exit(2)


class Comm:
    """Sends (non-blocking, kept alive until done) and receives (bounded) with one peer at a time."""

    def __init__(self, rank: int, world: int, hosts: list[str], timeout: float, device: str,
                 watchdog: Watchdog):
        self.rank, self.world, self.hosts, self.timeout = rank, world, hosts, timeout
        self.device, self.watch = device, watchdog
        self._sends: deque = deque()
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # private API: without it failures still name the peer that vanished
            self.store = None

    # ---- failures --------------------------------------------------------------------------------
    def lost(self, peer: int, err: Exception) -> RankFailure:
        msg = str(err)
        low = msg.lower()
        if any(s in low for s in ("closed", "reset", "broken pipe", "refused", "eof", "connection")):
            why = "exited or crashed"
        elif "timed out" in low or "timeout" in low:
            why = f"sent nothing for {self.timeout:g} s (a stalled link or a stuck process)"
        else:
            why = f"failed: {msg.splitlines()[0][:200]}"
        culprit, reason = peer, why
        if self.store is not None and peer != 0:  # the store lives on rank 0: no use asking it
            try:  # the first rank to notice names the culprit; the others repeat it
                if not self.store.check([_BLAME_KEY]):
                    self.store.set(_BLAME_KEY, f"{peer}|{why}")
                c, reason = self.store.get(_BLAME_KEY).decode().split("|", 1)
                culprit = int(c)
            except Exception:
                culprit, reason = peer, why
        host = self.hosts[culprit] if 0 <= culprit < len(self.hosts) else "?"
        return RankFailure(f"rank {culprit} ({host}) {reason}; rank {self.rank} stopped")

    def _guard(self, peer: int, what: str, fn):
        self.watch.beat(what)
        try:
            return fn()
        except RuntimeError as e:
            raise self.lost(peer, e) from None
        finally:
            self.watch.beat()

    # ---- messages --------------------------------------------------------------------------------
    def send(self, t: torch.Tensor, dst: int) -> None:
        _, wire = _WIRE[t.dtype]
        w = t.to(self.device).contiguous()  # a GPU stage under gloo: staged through host memory
        w = w.view(wire) if wire != t.dtype else w
        work = self._guard(dst, f"sending to rank {dst}", lambda: dist.isend(w, dst))
        self._sends.append((work, w, dst))
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        _, wire = _WIRE[dtype]
        buf = torch.empty(shape, dtype=wire, device=self.device)
        self._guard(src, f"waiting for rank {src}", lambda: dist.recv(buf, src))
        return buf.view(dtype) if wire != dtype else buf

    def send_tensor(self, t: torch.Tensor, dst: int, header: list[int]) -> None:
        """A header [*header, dtype code, ndim, *shape] then the tensor itself."""
        code = _WIRE[t.dtype][0]
        self.send(torch.tensor([*header, code, t.dim(), *t.shape, *([0] * (4 - t.dim()))],
                               dtype=torch.int64, device=self.device), dst)
        self.send(t, dst)

    def recv_tensor(self, src: int, n_header: int) -> tuple[list[int], torch.Tensor | None]:
        """(header, tensor); the tensor is None when the header says ndim 0 (a stop message)."""
        h = self.recv((n_header + 6,), torch.int64, src).tolist()
        head, code, ndim, shape = h[:n_header], h[n_header], h[n_header + 1], h[n_header + 2:n_header + 2 + 4]
        if ndim == 0:
            return head, None
        return head, self.recv(tuple(shape[:ndim]), _FROM_CODE[code], src)

    def send_stop(self, dst: int, n_header: int) -> None:
        self.send(torch.zeros(n_header + 6, dtype=torch.int64, device=self.device), dst)

    def flush(self) -> None:
        """Wait for every send still in flight (each bounded by the process group's timeout)."""
        while self._sends:
            work, _, dst = self._sends[0]
            self._guard(dst, f"finishing a send to rank {dst}", work.wait)
            self._sends.popleft()
