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


def _wait_policy(argv: list[str] | None = None) -> None:
    """On a machine already running more work than it has cores, OpenMP threads that spin while
    they wait take CPU from each other and from every other process: a 2-thread prefill ran ~10x
    slower there (docs/BENCHMARKS.md, "Start-up"). They then sleep instead. So do a server's: its
    event loop shares the engine's cores every token (one streamed client's gap 13.4 ms passive
    against 17.1 ms spinning, docs/BENCHMARKS.md, "Serving"). Read once, when torch loads libgomp,
    so set before any import of torch; the user's own setting is left as it is."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return
    args = sys.argv[1:] if argv is None else argv
    try:
        busy = os.getloadavg()[0] >= len(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        busy = False
    if busy or (args[:1] == ["serve"]):
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
