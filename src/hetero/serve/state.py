"""What every handler shares, kept on `app.state.serve`, and the dependency that hands it to them."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from hetero.serve.budget import BudgetWatch
from hetero.serve.metrics import Metrics
from hetero.serve.scheduler import Scheduler


@dataclass
class ServeState:
    """The runtime engine being served, the scheduler in front of it, and the server's limits."""

    engine: Any                  # a runtime Engine: .plan, .model, .stream(), .report(), .over_budget()
    scheduler: Scheduler
    metrics: Metrics
    model_id: str
    known: set[str]              # every id a request may name the model by
    context: int                 # tokens a request may use: prompt + max_tokens (the planned context)
    max_body_bytes: int
    watch: BudgetWatch           # the plan's budgets against the measured footprint

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": int(time.time()), "owned_by": "hetero",
                "context_length": self.context}


def get_state(request: Request) -> ServeState:
    return request.app.state.serve
