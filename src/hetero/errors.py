"""User-facing errors: the CLI prints these as one line and exits with code 2, never a traceback."""


class HeteroError(Exception):
    """Bad input or an impossible request, explained in one line."""

    exit_code = 2
