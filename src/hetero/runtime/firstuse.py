"""First-use artifacts — a GGUF model's spec and converted tokenizer, the runtime's own size — are
built in a child process, so that the first run of a model holds its memory budget as the tenth does.

Each is computed once and cached on disk; building one in this process would leave its temporaries
(the gguf reader's ~120 MB of metadata objects, transformers imported for a vocabulary conversion)
in the run's peak and in the baseline the planner reserves. A child's memory leaves with it. (The
machine's profile is measured the same way: hardware.profile.get_profile_isolated.)
"""
from __future__ import annotations

import json
import subprocess
import sys

from hetero.errors import HeteroError

_BASELINE = ("import json, sys; from hetero.runtime.baseline import measure_process_size; "
             "measure_process_size(json.load(sys.stdin)['model'])")
_TOKENIZER = ("import json, sys; from hetero.model.sources import resolve, resolve_spec; "
              "from hetero.model.tokenizer import load_tokenizer; m = json.load(sys.stdin)['model']; "
              "load_tokenizer(resolve(m), resolve_spec(m).vocab_size, None)")


def prepare(model: str | None) -> None:
    """Build whatever of (spec, tokenizer) a run of `model` would otherwise build in its own process."""
    from hetero.model.sources import gguf_spec_cache_path, resolve
    from hetero.model.tokenizer import gguf_tokenizer_cached

    src = resolve(model)
    if src.kind == "gguf" and not (gguf_spec_cache_path(src).is_file() and gguf_tokenizer_cached(src.path)):
        _child(_TOKENIZER, {"model": model}, "reading the model's header and tokenizer")


def _child(code: str, args: dict, what: str) -> None:
    print(f"note: {what} once, in a child process", file=sys.stderr, flush=True)
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(args), text=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {r.returncode}"
        if last.startswith("hetero.errors.HeteroError: "):
            raise HeteroError(last[len("hetero.errors.HeteroError: "):])
        raise HeteroError(f"{what} failed in a child process: {last[:300]}")


def refuse_early(model: str | None, memory_text: str | None) -> None:
    """Refuse a cpu budget below what the runtime itself holds before this process loads the runtime
    (torch, kernels, warm-ups: a few hundred MB), so that a refused run never peaks over its budget.
    The runtime's size is the cached measurement, taken in a child on first use."""
    if not memory_text:
        return
    from hetero.model.sources import resolve_spec
    from hetero.plan.units import fmt_bytes, parse_memory
    from hetero.runtime.baseline import known_baseline

    cpu = parse_memory(memory_text, resolve_spec(model)).get("cpu")
    if cpu is None:
        return
    need = known_baseline(model)
    if need is None:
        _child(_BASELINE, {"model": model}, "measuring the runtime's own memory")
        need = known_baseline(model)
    if need is not None and need > cpu:
        raise HeteroError(f"the runtime itself needs {fmt_bytes(need)} of cpu, more than its budget of {fmt_bytes(cpu)}")
