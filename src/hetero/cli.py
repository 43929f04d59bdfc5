"""The one `hetero` command. Each subcommand lives in hetero/commands/<topic>.py and is discovered
here; those modules import heavy libraries (torch, transformers) inside the command bodies so that
`hetero --help` stays fast."""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import typer

from hetero.errors import HeteroError

app = typer.Typer(
    name="hetero",
    help="Run large language models fast on the hardware you have: plan, compress, run, measure, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    import hetero.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"hetero.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_commands()


def _others_running(samples: int = 3, gap_s: float = 0.01) -> int | None:
    """How many other threads are running on the machine now: the fewest of a few readings of
    /proc/stat's procs_running, less this process (None where there is no /proc/stat)."""
    import time

    seen = []
    for i in range(samples):
        try:
            with open("/proc/stat") as f:
                seen += [int(line.split()[1]) for line in f if line.startswith("procs_running")]
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(gap_s)
    return max(0, min(seen) - 1) if seen else None


def _wait_policy(argv: list[str] | None = None) -> None:
    """On a machine already running more work than it has cores, OpenMP threads that spin while
    they wait take CPU from each other and from every other process: a 2-thread prefill ran ~10x
    slower there (docs/BENCHMARKS.md, "Start-up"). They then sleep instead. Read once, when torch
    loads libgomp, so set before any import of torch; a quiet machine and the user's own setting
    are left as they are.

    Busy means busy now (threads running at start), not the 1-minute load average: that average
    still counts the hetero command that just finished, and sleeping threads cost the compiled
    decode step ~2.7x on a quiet machine (a `hetero bench` right after `--calibrate` measured that)."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"] and "--no-batching" not in args:
        # a batching server's worker, event loop and clients share the engine's cores every step:
        # spinning waits lose their cores mid-step (measured on the built-in model, 1 client: 54-58
        # tok/s sleeping against 42 spinning; 8 clients 73-79 against 49-63 aggregate). Serving one
        # stream at a time (--no-batching) is the other way round (114 against 74), so it spins.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return
    others = _others_running()
    if others is None:
        try:
            others = int(os.getloadavg()[0])
        except (OSError, AttributeError):
            return
    if others >= cores:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> None:
    """Console entry point, the one error boundary: HeteroError (bad input) becomes one line on
    stderr and exit code 2; anything else is a bug, reported in one line with exit code 1
    (HETERO_DEBUG=1 shows the traceback)."""
    import os

    _wait_policy(argv)

    try:
        app(args=argv, standalone_mode=True)
    except HeteroError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("HETERO_DEBUG") == "1":
            raise
        msg = " ".join(str(e).split())[:300]
        print(f"internal error (bug): {type(e).__name__}: {msg}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
