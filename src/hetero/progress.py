"""A progress bar for long work (rich, on stderr), silent when disabled or not a terminal."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, total: float, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yields `advance(n=1, note=None)` (note: text shown after the description, e.g. a loss).
    Rendered only when enabled and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n=1, note=None: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.console import Console

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as p:
        task = p.add_task(description, total=total)
        def advance(n=1, note=None):
            if note is not None:
                p.update(task, description=f"{description} {note}")
            p.advance(task, n)

        yield advance
