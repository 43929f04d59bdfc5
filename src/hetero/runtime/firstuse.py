"""First-use artifacts — the machine's profile, a GGUF model's spec and converted tokenizer — are built
in a child process, so that the first run of a model holds its memory budget as the tenth does.

Each is computed once and cached on disk; building one in this process would leave its temporaries
(the profile's GB-sized probe buffers, the gguf reader's ~120 MB of metadata objects,
transformers imported for a vocabulary conversion) in the
run's peak and in the baseline the planner reserves. A child's memory leaves with it.
"""
from __future__ import annotations

import json
import subprocess
import sys

from hetero.errors import HeteroError

_PROFILE = "from hetero.hardware.profile import get_profile; get_profile(progress=True)"
_TOKENIZER = ("import json, sys; from hetero.model.sources import resolve, resolve_spec; "
              "from hetero.model.tokenizer import load_tokenizer; m = json.load(sys.stdin)['model']; "
              "load_tokenizer(resolve(m), resolve_spec(m).vocab_size, None)")


def prepare(model: str | None, hardware: str | None = None) -> None:
    """Build whatever of (profile, spec, tokenizer) a run of `model` here would build itself."""
    if hardware in (None, "", "this", "local"):
        from hetero.hardware.inventory import host_name
        from hetero.hardware.profile import load_cached

        if load_cached(host_name(), True) is None:
            _child(_PROFILE, {}, "measuring this machine's profile")
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
