"""What a start costs, bounded by what gets imported (machine-independent, unlike seconds): the CLI
and its help load no heavy library, and a warm run of the built-in model loads neither transformers
(its tokenizer comes from `tokenizers`) nor scipy nor the gguf package."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "scipy", "numpy", "gguf", "tokenizers", "jinja2", "rich")

# runs hetero's CLI in this interpreter, then prints which top-level packages it had imported
PROBE = """
import json, sys
from hetero.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("MODULES " + json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def imported(*args: str, env: dict | None = None) -> tuple[set[str], str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=600,
                         env=env)
    line = next(x for x in out.stdout.splitlines() if x.startswith("MODULES "))
    return set(json.loads(line.removeprefix("MODULES "))), out.stdout


def test_importing_the_cli_loads_no_heavy_library():
    code = "import sys, hetero.cli; print(sorted({m.split('.')[0] for m in sys.modules}))"
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not [h for h in HEAVY if f"'{h}'" in mods], mods


def test_help_loads_no_heavy_library():
    mods, out = imported("--help")
    heavy = set(HEAVY) - {"rich"}  # typer draws its help with rich
    assert "run" in out and not mods & heavy, sorted(mods & heavy)


@pytest.mark.slow
def test_a_warm_run_of_the_builtin_model_loads_neither_transformers_nor_gguf(tmp_path):
    # every run plans, so scipy (the MILP, ~0.4 s) is loaded; transformers and gguf must not be
    env = {**os.environ, "HETERO_CACHE": str(tmp_path)}
    args = ("run", "-p", "hi", "--max-new-tokens", "3", "--json")
    cold_mods, cold = imported(*args, env=env)  # converts the GGUF vocabulary once, through transformers
    warm_mods, warm = imported(*args, env=env)
    assert "torch" in warm_mods and "tokenizers" in warm_mods
    assert "scipy" in warm_mods  # the run was planned
    assert not warm_mods & {"transformers", "gguf"}, sorted(warm_mods & {"transformers", "gguf"})
    ids = [json.loads(x)["token_ids"] for x in (cold.splitlines()[0], warm.splitlines()[0])]
    assert ids[0] == ids[1] and len(ids[0]) == 3   # the cache changes how the tokenizer loads, not what runs
