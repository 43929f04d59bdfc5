"""hetero bench: bad input is one line and exit 2; peers that are missing are named, not fatal."""
from __future__ import annotations

import pytest

from hetero.cli import main


@pytest.mark.parametrize("args, needle", [
    (["synthetic:tiny", "--peers", "vllm"], "unknown peer"),
    (["synthetic:tiny", "--sweep"], "--memory"),
    (["synthetic:tiny", "--grid-contexts", "a,b"], "--grid-contexts"),
    (["synthetic:tiny", "--grid-residencies", "ram"], "--grid-residencies"),
    (["synthetic:tiny", "--repeats", "0"], "at least 1"),
    (["synthetic:tiny", "--plan", "p.json", "--memory", "cpu=1GB"], "either --plan"),
    (["no-such-model"], "error"),
])
def test_bad_input(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert needle in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_missing_peer_is_a_note():
    from hetero.bench.peers import missing, run_peers

    why = missing("llama.cpp", "synthetic:tiny")
    assert why is not None and ("GGUF" in why or "not installed" in why)  # never runs a safetensors model
    assert "unknown peer" in missing("vllm", "synthetic:tiny")
    rows = run_peers(["llama.cpp"], "synthetic:tiny", 8, 2, 1)
    assert rows[0]["peer"] == "llama.cpp" and "skipped" in rows[0]
