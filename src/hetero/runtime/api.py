"""The Python API: `hetero.load(MODEL) -> Model` with `.generate()` and `.stream()`."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

from hetero.dtypes import PRECISIONS
from hetero.errors import HeteroError
from hetero.model.units import UnitConfig
from hetero.model.spec import ModelSpec
from hetero.model.tokenizer import Tokenizer
from hetero.runtime.generate import Record, stream_generate
from hetero.runtime.sampling import SamplingParams

Messages = Sequence[dict]
Prompt = Union[str, Messages]

PRECISION_NAMES = {**{p: p for p in PRECISIONS}, "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class Model:
    """A loaded model ready to generate: its spec, the Decoder (`net`, with `net.units` the choice per
    unit), the tokenizer, and the engine that built it (None for a bare wrapper)."""

    def __init__(self, spec: ModelSpec, net, tokenizer: Tokenizer, load_s: float = 0.0):
        self.spec, self.net, self.tokenizer, self.load_s = spec, net, tokenizer, load_s
        self.engine = None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def prompt_ids(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids of a prompt: a string (wrapped in the chat template when chat is on) or messages."""
        if isinstance(prompt, str):
            use_chat = self.tokenizer.has_chat_template if chat is None else chat
            if use_chat:
                return self.tokenizer.chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        for m in prompt:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise HeteroError("each message must be an object with 'role' and 'content'")
        return self.tokenizer.chat(list(prompt))

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: list[str] | None = None, stop_ids: set[int] | None = None,
               chat: bool | None = None) -> Iterator[Record]:
        """Yield Records (text delta, token ids, prompt/decode tok/s, finish reason) as tokens come."""
        ids = self.prompt_ids(prompt, chat)
        if len(ids) >= self.spec.max_context:
            raise HeteroError(f"prompt is {len(ids)} tokens but the context is {self.spec.max_context}")
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        ids_stop = None if stop_ids is None else set(stop_ids) | self.tokenizer.stop_ids
        yield from stream_generate(self.net, self.tokenizer, ids, max_new_tokens, params, stop, ids_stop)

    def generate(self, prompt: Prompt, **kwargs) -> str:
        return "".join(r.text for r in self.stream(prompt, **kwargs))


def load(model: str | None = None, dtype: str = "fp32", device: str = "cpu",
         units: dict[str, UnitConfig] | None = None, threads: int | None = None,
         memory: str | None = None, plan=None, precisions: list[str] | None = None,
         kv_dtype: str | None = None) -> Model:
    """Load MODEL (path, HF dir, `smollm2-135m`, `synthetic:NAME`) through a Plan and the one engine.

    With `memory` ("cpu=50%", as `hetero run --memory`) or `precisions`, the planner chooses every unit
    within the budget; with `plan` (a Plan or a path) that plan runs; otherwise every unit is at
    `dtype` on `device` unless `units` says otherwise per unit (a fixed plan, priced but not optimised).
    The Model keeps its engine as `.engine` (`.engine.plan`, `.engine.report()`, `.close()`).
    kv_dtype: how the KV cache is stored (auto | fp32 | bf16 | int8; None: the plan's, else auto).
    """
    from hetero.runtime import engine as eng
    from hetero.runtime.memory import Footprint

    precision = PRECISION_NAMES.get(dtype)
    if precision is None:
        raise HeteroError(f"unknown dtype {dtype!r}; known: {', '.join(PRECISIONS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HeteroError(f"device {device} requested but CUDA is not available here")
    if threads:
        torch.set_num_threads(threads)
    planned = memory is not None or plan is not None or precisions is not None
    if plan is not None and not isinstance(plan, (str, Path)):
        the_plan = plan
    elif planned:
        the_plan, _ = eng.plan_for_run(model, str(plan) if plan is not None else None, memory,
                                       precisions=precisions, kv_dtype=kv_dtype)
    else:
        the_plan = _fixed(model, units or {}, UnitConfig(device, precision), kv_dtype or "auto")
    if kv_dtype is not None and the_plan.kv_dtype != kv_dtype:
        raise HeteroError(f"the plan stores its KV cache as {the_plan.kv_dtype}, not {kv_dtype}")
    # a fixed plan builds straight from the weights (no budget to hold); a planned one as `hetero run`
    e = eng.Engine.load(the_plan, model, progress=False, monitor=Footprint(), use_cache=planned)
    e.model.engine = e
    return e.model


def _fixed(model: str | None, units: dict[str, UnitConfig], default: UnitConfig, kv_dtype: str = "auto"):
    """The plan of hetero.load(dtype=..., device=..., units=...): those choices, every unit resident."""
    from hetero.hardware.inventory import inventory
    from hetero.hardware.profile import load_cached
    from hetero.model.sources import resolve_spec
    from hetero.plan.make import fixed_plan

    spec = resolve_spec(model)
    hw = inventory()
    choices = {u: (c.device, c.precision, "resident") for u in spec.unit_names()
               for c in [units.get(u, default)]}
    return fixed_plan(spec, hw, load_cached(hw.host, True), choices, kv_dtype=kv_dtype)
