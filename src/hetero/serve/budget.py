"""The plan's memory budgets held while serving: checked after every generation, a device that goes
over is reported once (as `hetero run` reports it) and shown by /report and /metrics."""
from __future__ import annotations

import sys
import threading
from typing import Any, Callable


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class BudgetWatch:
    def __init__(self, engine: Any, warn: Callable[[str], None] = _stderr):
        self.engine, self.warn = engine, warn
        self.over: dict[str, tuple[int, int]] = {}
        self.lock = threading.Lock()

    def check(self) -> dict[str, tuple[int, int]]:
        """Devices over budget now (device -> (measured peak, budget)); warns for each newly over."""
        from hetero.plan.units import fmt_bytes

        over = self.engine.over_budget()
        with self.lock:
            for d, (m, b) in over.items():
                if d not in self.over:
                    self.warn(f"warning: {d} footprint {fmt_bytes(m)} is over its budget of {fmt_bytes(b)}")
            self.over = dict(over)
        return over
