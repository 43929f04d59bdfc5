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


SERVE_SPINCOUNT = 30000  # libgomp spins before a waiting worker sleeps (~100k a millisecond)


def _wait_policy(argv: list[str] | None = None) -> None:
    """On a machine already running more work than it has cores, OpenMP threads that spin while
    they wait take CPU from each other and from every other process: a 2-thread prefill ran ~10x
    slower there (docs/BENCHMARKS.md, "Start-up"). They then sleep instead. Read once, when torch
    loads libgomp, so set before any import of torch; a quiet machine and the user's own setting
    are left as they are.

    Busy means busy now (threads running at start), not the 1-minute load average: that average
    still counts the hetero command that just finished, and sleeping threads cost the compiled
    decode step ~2.7x on a quiet machine (a `hetero bench` right after `--calibrate` measured that)."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ or "torch" in sys.modules:
        return
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"] and "--no-batching" not in args:
        # a batching server's worker, event loop and clients share the engine's cores every step:
        # workers that spin without end take a core from them between steps, workers that sleep at
        # once are woken through the kernel at every parallel region. A short spin (~0.1 ms) spans
        # the gaps inside a step and sleeps between steps: on the built-in model, 1 client 71-80
        # tok/s against 48 sleeping and 72 spinning (docs/BENCHMARKS.md, "Serving"). Serving one
        # stream at a time (--no-batching) keeps the default.
        os.environ["GOMP_SPINCOUNT"] = str(SERVE_SPINCOUNT)
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
