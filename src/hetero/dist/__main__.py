"""One pipeline rank: `torchrun ... -m hetero.dist MODEL --hosts hosts.yaml -p PROMPT` on every host,
or spawned by `hetero pipeline` (hetero.dist.launch). RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
come from the environment. Rank 0 prints the generated text (or writes --out JSON); an error is one
line `error: ...` on stderr and exit status 2 on every rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hetero.dist", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--hosts", required=True, help="the hosts file (YAML)")
    p.add_argument("-p", "--prompt", action="append", default=[], help="a prompt (repeat for several sequences)")
    p.add_argument("--job", help="a JSON job (hetero.dist.pipeline.Job fields) instead of -p")
    p.add_argument("-n", "--max-new-tokens", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--precisions", help="precisions the planner may use per unit, e.g. bf16,int8 (default: as hetero run)")
    p.add_argument("--dtype", help="shorthand for --precisions DTYPE")
    p.add_argument("--memory", help="every rank's budgets, as hetero run --memory (e.g. cpu=800MB)")
    p.add_argument("--objective", default="decode")
    p.add_argument("--layers", help="decoder layers per stage, e.g. 16,14 (default: the cost-model split)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a silent rank is an error")
    p.add_argument("--load-timeout", type=float, default=600.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="rank 0: write the result JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    # c10d warns in C++ (with a stack dump) when a dead rank 0 takes the store with it: our error says it
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from hetero.errors import HeteroError

    a = _parser().parse_args(argv)
    try:
        from hetero.dist.hosts import load_hosts
        from hetero.dist.pipeline import Job, precision_list, run_rank

        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise HeteroError("RANK / WORLD_SIZE are not set: start ranks with torchrun, or use `hetero pipeline`")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        hosts = load_hosts(a.hosts)
        job = None
        if rank == 0:
            if a.job:
                job = Job(**json.loads(open(a.job).read()))
            else:
                layers = [int(x) for x in a.layers.split(",")] if a.layers else None
                job = Job(prompts=a.prompt or ["What is the capital of France?"], max_new_tokens=a.max_new_tokens,
                          micro_batch=a.micro_batch, precisions=precision_list(a.precisions, a.dtype),
                          memory=a.memory, objective=a.objective, layers=layers)
        result = run_rank(a.model, hosts, rank, world, job, a.timeout, a.load_timeout, a.threads)
        if rank == 0:
            if a.out:
                tmp = f"{a.out}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump(result, f)
                os.replace(tmp, a.out)
            else:
                for s in result["sequences"]:
                    print(s["text"])
                print(f"[{result['generated_tokens']} tokens, {result['tok_s']:.1f} tok/s over {world} ranks]",
                      file=sys.stderr)
        sys.stdout.flush()
        return 0
    except HeteroError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(2)  # skip interpreter teardown: a dead peer can make process-group cleanup block
    except KeyboardInterrupt:
        os._exit(130)
    except Exception:  # a bug, not bad input: keep the traceback, still never linger
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
