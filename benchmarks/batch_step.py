"""Where a batched decode step's time goes: the median step at B rows against the one-token single
path, and torch's profile of a few batched steps (the ops Python runs; one compiled call when the
batched decode stack serves the step).

    PYTHONPATH=src .venv/bin/python benchmarks/batch_step.py --precision int4 --batch 1,4,8,16
    PYTHONPATH=src .venv/bin/python benchmarks/batch_step.py --model FILE.gguf --precision native --batch 1,8 --split

--model takes a built-in name or a file; --split says how much of a step is the compiled stack call
(every layer), the head and the rest (Python, sampling); --threads sets torch's threads.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def step_times(net, batch: int, prompt: int, steps: int, profile: bool = False, split=None):
    """Each decode step's seconds (and torch's profile of them with `profile`); `split` (a _Split)
    counts from the first decode step."""
    from hetero.bench.measure import prompt_ids
    from hetero.runtime.batch import BatchRunner

    runner = BatchRunner(net, kv_bytes=64 << 20, max_batch=batch, prefill_tokens=max(512, prompt))
    for i in range(batch):
        runner.add(prompt_ids(net.spec.vocab_size, prompt, i)[0].tolist(), steps + 1)
    runner.step()                      # every prompt prefilled in one step
    if split is not None:
        split.t = dict.fromkeys(split.t, 0.0)
    out = []
    with torch.profiler.profile() if profile else contextlib.nullcontext() as prof:
        while not runner.idle:
            t = time.perf_counter()
            runner.step()
            out.append(time.perf_counter() - t)
    return (out, prof) if profile else out


class _Split:
    """Seconds spent in the compiled stack's step_rows and in the head, over the steps it wraps."""

    def __init__(self, net):
        self.net, self.t = net, {"stack": 0.0, "head": 0.0}
        stack, head = net._decode_stack(), net.head
        name = "logits" if hasattr(head, "logits") else "rows" if hasattr(head, "rows") else None
        split = self

        class Stack:
            def __getattr__(self, a):
                return getattr(stack, a)

            def step_rows(self, *a):
                t = time.perf_counter()
                out = stack.step_rows(*a)
                split.t["stack"] += time.perf_counter() - t
                return out

        def timed(fn, key):
            def call(*a):
                t = time.perf_counter()
                out = fn(*a)
                split.t[key] += time.perf_counter() - t
                return out
            return call

        self._undo = [(net, "_decode_stack", net._decode_stack)]
        net._decode_stack = lambda: Stack() if stack is not None else None
        if name is not None:
            self._undo.append((head, name, getattr(head, name)))
            setattr(head, name, timed(getattr(head, name), "head"))

    def close(self):
        for obj, name, fn in reversed(self._undo):
            setattr(obj, name, fn)


def single_times(net, prompt: int, steps: int) -> list[float]:
    from hetero.bench.measure import prompt_ids
    from hetero.runtime.generate import generate_step
    from hetero.runtime.sampling import Sampler, SamplingParams

    ids = prompt_ids(net.spec.vocab_size, prompt, 0)[0].tolist()
    stamps = [t for _, t in generate_step(net, ids, steps + 1, Sampler(SamplingParams()), set())]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    import hetero

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--batch", default="1,4,8,16")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--profile", type=int, default=8, help="profile this batch size (0: none)")
    ap.add_argument("--split", action="store_true", help="time the stack call and the head inside each step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    net = hetero.load(args.model, dtype=args.precision).net
    with torch.inference_mode():
        single_times(net, args.prompt, 4)                                    # warm up
        one = statistics.median(single_times(net, args.prompt, args.steps))
        print(f"single path: {one * 1e3:.2f} ms/token")
        for b in [int(v) for v in args.batch.split(",")]:
            step_times(net, b, args.prompt, 4)
            split = _Split(net) if args.split else None
            times = step_times(net, b, args.prompt, args.steps, split=split)
            st = statistics.median(times)
            print(f"B={b:3d}: step {st * 1e3:7.2f} ms  ({st / one:4.2f}x the single step)  "
                  f"aggregate {b / st:7.1f} tok/s  ({b * one / st:4.2f}x one sequence)")
            if split is not None:
                split.close()
                n = len(times)
                print(f"       per step: stack {split.t['stack'] / n * 1e3:.2f} ms, head "
                      f"{split.t['head'] / n * 1e3:.2f} ms, rest {(sum(times) - sum(split.t.values())) / n * 1e3:.2f} ms")
        if args.profile:
            _, prof = step_times(net, args.profile, args.prompt, 6, profile=True)
            print(f"profile of 6 decode steps at B={args.profile}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
