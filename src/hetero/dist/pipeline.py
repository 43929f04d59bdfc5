"""Pipeline execution: every rank runs one contiguous stage; only activations cross the links.

Rank 0 holds the first stage (embedding ...) and drives: it sends each micro-batch's hidden states
down the chain; the last rank (... norm, head) samples the next tokens and sends them back to rank 0,
which decides whether that micro-batch goes on. With M micro-batches in flight every stage works on a
different one at once (a pipeline over the decode steps), so M ≥ stages keeps every rank busy.

Messages: header [op, micro-batch, start, T, want-logits] + the tensor ([B, T] ids never travel; [B, T, h]
hidden states do; the last rank returns [B] token ids). Launch: torchrun (env://) or `launch.spawn_local`.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from hetero.dist.comm import Comm, Watchdog
from hetero.dist.hosts import Hosts
from hetero.errors import HeteroError
from hetero.runtime.memory import peak_rss_bytes

OP_RUN = 1
N_HEADER = 5  # op, micro-batch, start, T, want


@dataclass
class Job:
    """What to generate: prompts (text, or token ids) and how; rank 0 holds it and broadcasts it."""
    prompts: list                          # str | list[int] per sequence
    max_new_tokens: int = 32
    micro_batch: int = 1                   # sequences per micro-batch (equal prompt lengths only)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    chat: bool | None = None
    ignore_stop: bool = False              # benchmarks: always generate max_new_tokens
    precisions: list[str] | None = None    # what the planner may use per unit (None: as `hetero run`)
    memory: str | None = None              # budgets of every rank alone, as `hetero run --memory` ("cpu=300MB")
    objective: str = "decode"
    layers: list[int] | None = None        # decoder layers per stage; None = the cost-model split
    prompt_ids: list[list[int]] = field(default_factory=list)  # filled on rank 0


def precision_list(precisions: str | None, dtype: str | None) -> list[str] | None:
    """--precisions a,b (or --dtype X, its shorthand) as the planner's list; None: as `hetero run`."""
    from hetero.dtypes import PRECISIONS

    if precisions and dtype:
        raise HeteroError("give --precisions or --dtype, not both")
    out = [p.strip() for p in (precisions or dtype or "").split(",") if p.strip()]
    for p in out:
        if p not in PRECISIONS:
            raise HeteroError(f"unknown precision {p!r}; known: {', '.join(PRECISIONS)}")
    return out or None


def micro_batches(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Sequence indices per micro-batch: consecutive prompts of equal length, up to `size` each."""
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if out and len(out[-1]) < size and len(prompts[out[-1][0]]) == len(p):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def run_rank(model: str, hosts: Hosts, rank: int, world: int, job: Job | None, timeout: float = 30.0,
             load_timeout: float = 600.0, threads: int | None = None, on_token=None) -> dict | None:
    """Run this rank to the end. Rank 0 returns the result (tokens, speeds, per-rank memory)."""
    if world != hosts.world_size:
        raise HeteroError(f"the hosts file describes {hosts.world_size} ranks but WORLD_SIZE is {world}")
    rank_hosts = [h.address for h in hosts.rank_hosts()]
    devices = rank_devices(hosts)
    if threads:
        torch.set_num_threads(threads)
    watch = Watchdog(rank, load_timeout)
    # nccl only when every rank names its own GPU; otherwise gloo, with GPU stages staged through host memory
    backend = "nccl" if all(d.startswith("cuda") for d in devices) else "gloo"
    comm_device = devices[rank] if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(devices[rank])
    watch.beat("joining the process group")
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
    except Exception as e:  # rendezvous: a rank that never came up
        raise HeteroError(f"rank {rank}: could not join the other ranks within {timeout:g} s: "
                          f"{str(e).splitlines()[0][:200]}") from None
    comm = Comm(rank, world, rank_hosts, timeout, comm_device, watch)
    try:
        return _run(model, hosts, rank, world, job, comm, load_timeout, on_token)
    finally:
        watch.stop()


def _setup(model: str, hosts: Hosts, job: Job | None, rank: int, world: int, comm: Comm):
    """Rank 0 tokenizes and splits the model; every rank receives the job and its stage bounds."""
    from hetero.model.sources import resolve, resolve_spec

    spec = resolve_spec(model)
    box: list = [None]
    tok = None
    if rank == 0:
        from hetero.runtime.api import Model
        from hetero.model.tokenizer import load_tokenizer

        src = resolve(model)
        if src.kind == "synthetic":  # written once here, before the other ranks look for it
            from hetero.model.synthetic import ensure_weights

            ensure_weights(src.name)
        # token-id prompts that ignore stop tokens (benchmarks, tests) need no tokenizer: skip its load
        if not job.ignore_stop or any(isinstance(p, str) for p in job.prompts):
            tok = load_tokenizer(src, spec.vocab_size, None)
        shim = Model(spec, None, tok)  # prompt_ids only: the chat template and encoding of hetero.load
        job.prompt_ids = [list(p) if isinstance(p, (list, tuple)) else shim.prompt_ids(p, job.chat)
                          for p in job.prompts]
        for ids in job.prompt_ids:
            if not ids or len(ids) >= spec.max_context:
                raise HeteroError(f"each prompt needs 1..{spec.max_context - 1} tokens, got {len(ids)}")
        comm.watch.beat("planning")
        split, plan = _plan(model, spec, hosts, job)
        box[0] = (job, split, plan.to_dict())
    comm.watch.beat("receiving the job")
    try:
        # planning (the runtime's reserve, the solver) may take longer than a step's timeout
        dist.monitored_barrier(timeout=timedelta(seconds=comm.watch.limit), wait_all_ranks=True) \
            if dist.get_backend() == "gloo" else dist.barrier()
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as e:
        raise comm.lost(0, e) from None
    job, split, plan = box[0]
    from hetero.plan.plan import Plan

    return spec, job, split, Plan.from_dict(plan), tok


def _plan(model: str | None, spec, hosts: Hosts, job: Job):
    """The split's stage bounds, then each rank's units planned as `hetero run` plans (decode, its
    precisions) within that rank's budgets; every rank process holds this one's runtime reserve."""
    from hetero.dist.plan import pipeline_plan, split_precision, split_speeds, this_machine
    from hetero.dist.split import rank_speeds, split_model
    from hetero.runtime import baseline, devices

    n_mb = len(micro_batches(job.prompt_ids, job.micro_batch))
    longest = max(len(p) for p in job.prompt_ids)
    ctx = min(spec.max_context, longest + job.max_new_tokens)
    reserve = {"cpu": baseline.runtime_baseline(model), **devices.cuda_reserve()}
    raw = rank_speeds(hosts, this_machine())
    speeds = split_speeds(spec, raw, job.memory, reserve)
    precision = split_precision(speeds, job.precisions)
    try:
        split = split_model(spec, hosts, speeds, precision, job.micro_batch, n_mb, longest, ctx, job.layers)
    except HeteroError:
        if job.layers is not None:
            raise
        # nothing fits resident: balance by time alone, and let the planner stream what a rank cannot hold
        split = split_model(spec, hosts, speeds, precision, job.micro_batch, n_mb, longest, ctx, job.layers,
                            fit_memory=False)
    # the KV cache of every sequence, at the context they reach (as `hetero run` plans its one)
    return split, pipeline_plan(spec, raw, split, reserve, job.objective, job.precisions, job.memory,
                         prompt_tokens=longest, context=ctx, batch=len(job.prompt_ids))


def rank_devices(hosts: Hosts) -> list[str]:
    """The device each rank names in the hosts file (the k-th rank on a host takes its k-th device), "" if none."""
    return [h.devices[k % len(h.devices)] if h.devices else "" for h in hosts.hosts for k in range(h.ranks)]


def _run(model, hosts, rank, world, job, comm: Comm, load_timeout, on_token) -> dict | None:
    from hetero.dist.stage import rss_anon, trim_heap, weight_bytes
    from hetero.runtime.engine import Engine
    from hetero.runtime.memory import Footprint

    spec, job, split, plan, tok = _setup(model, hosts, job, rank, world, comm)
    st = split.stages[rank]
    # rank 0's tokenizer is counted in the reserve; the engine loads its own: keep one, not two
    has_tok = tok is not None
    del tok
    trim_heap()
    rss0, anon0 = _rss(), rss_anon()
    mon = Footprint().start()  # this rank's process, from before its weights: held against its budget
    t0 = time.perf_counter()
    comm.watch.beat(f"loading {st.first}..{st.last}", load_timeout)
    # the one engine, on this rank's stage of the plan: converts, builds resident units, streams disk ones
    eng = Engine.load(plan, model, progress=False, monitor=mon, stage=rank)
    stage = eng.model.net
    tok = eng.model.tokenizer if has_tok else None
    load_s = time.perf_counter() - t0
    trim_heap()
    rss1, anon1 = _rss(), rss_anon()
    comm.watch.beat("waiting for every rank to load")
    try:  # names a rank that never finished loading
        dist.monitored_barrier(timeout=timedelta(seconds=load_timeout), wait_all_ranks=True) \
            if dist.get_backend() == "gloo" else dist.barrier()
    except RuntimeError as e:
        raise HeteroError(f"rank {rank}: loading failed elsewhere: {str(e).splitlines()[0][:300]}") from None
    comm.watch.beat("generating", comm.timeout + 5.0)
    mbs = micro_batches(job.prompt_ids, job.micro_batch)
    runner = _Runner(spec, job, stage, comm, rank, world, mbs, comm.device)
    delay = float(os.environ.get("HETERO_DIST_STEP_DELAY", "0") or 0)  # tests: slow steps, kill mid-run
    try:
        result = runner.drive(tok, on_token, delay) if rank == 0 else runner.serve(delay)
        comm.flush()
        footprint, over = eng.footprint(), eng.over_budget()
        streaming = [pf.stats() for pf in eng.prefetchers]
    finally:
        eng.close()
    mine = eng.plan  # this rank's stage plan: its units' choices and its own budgets
    stats = {"rank": rank, "host": st.host, "units": f"{st.first}..{st.last}", "layers": st.layers,
             "choices": sorted({f"{u.device}/{u.precision}/{u.residency}" for u in mine.units}),
             "streamed_units": [u.name for u in mine.units if u.residency == "disk"],
             "budget_bytes": dict(mine.budgets), "planned_bytes": {d: mine.memory.get(d, 0) + mine.reserve.get(d, 0)
                                                                   for d in mine.memory},
             "footprint_bytes": footprint, "over_budget": {d: {"measured": m, "budget": b} for d, (m, b) in over.items()},
             "streaming": streaming, "build": eng.build,
             "weight_bytes": weight_bytes(stage),
             "planned_weight_bytes": sum(u.bytes for u in mine.units if u.residency == "resident"),
             "rss_before_load": rss0, "rss_after_load": rss1, "rss_load_delta": rss1 - rss0,
             "anon_before_load": anon0, "anon_after_load": anon1, "anon_load_delta": anon1 - anon0,
             "peak_rss": peak_rss_bytes(),
             "load_s": load_s, "compute_s": runner.compute_s, "steps": runner.steps}
    gathered = [None] * world if rank == 0 else None
    comm.watch.beat("gathering statistics")
    try:
        dist.gather_object(stats, gathered, dst=0)
    except RuntimeError as e:
        raise comm.lost(0 if rank else 1, e) from None
    dist.destroy_process_group()
    if rank != 0:
        return None
    result["ranks"] = gathered
    result["split"] = split.to_dict()
    result["plan"] = plan.to_dict()
    result["full_weight_bytes"] = sum(u.bytes for u in plan.units)
    return result


class _Runner:
    def __init__(self, spec, job: Job, stage, comm: Comm, rank: int, world: int, mbs, device):
        self.spec, self.job, self.stage, self.comm = spec, job, stage, comm
        self.rank, self.world, self.mbs, self.device = rank, world, mbs, device
        self.last = rank == world - 1
        self.caches: dict[int, object] = {}
        self.compute_s, self.steps = 0.0, 0
        self.max_len = [min(spec.max_context, len(job.prompt_ids[m[0]]) + job.max_new_tokens) for m in mbs]
        from hetero.runtime.sampling import Sampler, SamplingParams

        params = SamplingParams(job.temperature, job.top_k, job.top_p, job.repetition_penalty, job.seed)
        self.samplers = [Sampler(params) for _ in job.prompt_ids]  # the last stage samples
        self.history = [list(p) for p in job.prompt_ids]

    def _compute(self, m: int, x: torch.Tensor, start: int, want: bool) -> torch.Tensor:
        if start == 0:
            self.caches[m] = self.stage.new_cache(len(self.mbs[m]), self.max_len[m])
        t = time.perf_counter()
        out = self.stage(x, start, self.caches[m], want_logits=want)
        self.compute_s += time.perf_counter() - t
        self.steps += 1
        self.comm.watch.beat()  # progress: a lone rank has no messages to show it
        return out

    def _sample(self, m: int, logits: torch.Tensor) -> torch.Tensor:
        toks = []
        for row, seq in enumerate(self.mbs[m]):
            t = self.samplers[seq](logits[row], self.history[seq])
            self.history[seq].append(t)
            toks.append(t)
        return torch.tensor(toks, dtype=torch.int64, device=self.device)

    def _step(self, m: int, x: torch.Tensor, start: int, want: bool) -> torch.Tensor | None:
        """Run this stage on a micro-batch and pass it on; returns tokens when this rank is also the last."""
        out = self._compute(m, x, start, want)
        if self.last:
            if not want:
                return None
            toks = self._sample(m, out)
            if self.rank == 0:
                return toks
            self.comm.send(toks, 0)
            return None
        self.comm.send_tensor(out, self.rank + 1, [OP_RUN, m, start, x.shape[1], int(want)])
        return None

    def serve(self, delay: float) -> None:
        """Ranks 1..: receive, compute, pass on, until rank 0 says stop."""
        while True:
            head, x = self.comm.recv_tensor(self.rank - 1, N_HEADER)
            if x is None:
                if not self.last:
                    self.comm.send_stop(self.rank + 1, N_HEADER)
                return
            _, m, start, _, want = head
            if delay:
                time.sleep(delay)
            self._step(m, x.to(self.device), start, bool(want))

    def drive(self, tok, on_token, delay: float) -> dict:
        """Rank 0: prefill every micro-batch, then keep each one going until it is done."""
        from collections import deque

        from hetero.runtime.generate import PREFILL_CHUNK

        job = self.job
        stops = set() if job.ignore_stop or tok is None else set(tok.stop_ids)
        out = [[] for _ in job.prompt_ids]
        finish = [None] * len(job.prompt_ids)
        pos = [len(job.prompt_ids[m[0]]) for m in self.mbs]
        firsts: list[float] = []
        t0 = time.perf_counter()
        pending: deque = deque()
        local: dict[int, torch.Tensor] = {}
        log = os.environ.get("HETERO_DIST_LOG") == "1"  # progress lines on stderr (tests kill on them)

        def launch(m: int, ids: torch.Tensor, start: int) -> None:
            n = ids.shape[1]
            for s in range(0, n, PREFILL_CHUNK):  # chunked exactly as one process chunks a prompt
                r = self._step(m, ids[:, s:s + PREFILL_CHUNK], start + s, s + PREFILL_CHUNK >= n)
                if r is not None:
                    local[m] = r
            pending.append(m)

        for m, seqs in enumerate(self.mbs):
            launch(m, torch.tensor([job.prompt_ids[i] for i in seqs], dtype=torch.long), 0)
        while pending:
            m = pending.popleft()
            toks = local.pop(m) if self.world == 1 else self.comm.recv((len(self.mbs[m]),), torch.int64,
                                                                      self.world - 1)
            if pos[m] == len(job.prompt_ids[self.mbs[m][0]]):
                firsts.append(time.perf_counter())
            pos[m] += 1
            for seq, t in zip(self.mbs[m], toks.tolist()):
                if finish[seq] is None:
                    out[seq].append(t)
                    if on_token:
                        on_token(seq, t)
                    if t in stops:
                        finish[seq] = "stop"
                    elif len(out[seq]) >= job.max_new_tokens or pos[m] >= self.max_len[m]:
                        finish[seq] = "length"
            if log:
                print(f"rank 0: micro-batch {m} at position {pos[m]}", file=sys.stderr, flush=True)
            if all(finish[s] is not None for s in self.mbs[m]):
                continue
            if delay:
                time.sleep(delay)
            launch(m, toks.view(-1, 1).cpu(), pos[m] - 1)
        t_end = time.perf_counter()
        if self.world > 1:
            self.comm.send_stop(1, N_HEADER)
        gen = sum(len(o) for o in out)
        t_first = max(firsts) if firsts else t_end
        decode_tokens = gen - len(out)
        seqs = [{"prompt_tokens": len(p), "token_ids": o, "finish_reason": f,
                 "text": tok.decode(o) if tok is not None else ""}
                for p, o, f in zip(job.prompt_ids, out, finish)]
        return {"sequences": seqs, "generated_tokens": gen, "wall_s": t_end - t0,
                "prefill_s": t_first - t0, "tok_s": gen / (t_end - t0),
                "decode_tok_s": decode_tokens / (t_end - t_first) if t_end > t_first else 0.0,
                "micro_batches": len(self.mbs), "micro_batch": job.micro_batch, "world": self.world,
                "job": {k: v for k, v in asdict(job).items() if k not in ("prompts", "prompt_ids")}}
