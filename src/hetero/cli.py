"""The one `hetero` command. Each subcommand lives in hetero/commands/<topic>.py and is discovered
here; those modules import heavy libraries (torch, transformers) inside the command bodies so that
`hetero --help` stays fast."""
from __future__ import annotations

import importlib
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


def main(argv: list[str] | None = None) -> None:
    """Console entry point, the one error boundary: HeteroError (bad input) becomes one line on
    stderr and exit code 2; anything else is a bug, reported in one line with exit code 1
    (HETERO_DEBUG=1 shows the traceback)."""
    import os

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
