"""Running the `hetero` CLI in-process from tests, and checking its one-line errors."""
from __future__ import annotations

from hetero.cli import main


def run_cli(args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `hetero ARGS`."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_clean_error(code, err, *needles):
    """Exit code 2 and exactly one `error: ...` line (notes aside) naming every needle; no traceback."""
    assert code == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
