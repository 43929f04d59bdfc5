"""The Python API: `hetero.load(MODEL) -> Model` with `.generate()` and `.stream()`."""
from __future__ import annotations

import time
from typing import Iterator, Sequence, Union

import torch

from hetero.errors import HeteroError
from hetero.model.llama import LlamaModel, UnitConfig
from hetero.model.sources import resolve
from hetero.model.spec import ModelSpec
from hetero.model.tokenizer import Tokenizer, load_tokenizer
from hetero.model.weights import WeightStore, required
from hetero.runtime.generate import Record, stream_generate
from hetero.runtime.sampling import SamplingParams

Messages = Sequence[dict]
Prompt = Union[str, Messages]

PRECISION_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                   "fp16": "fp16", "float16": "fp16", "int8": "int8", "int4": "int4"}


class Model:
    """A loaded model ready to generate. `units` maps unit name -> UnitConfig (device, precision)."""

    def __init__(self, spec: ModelSpec, net: LlamaModel, tokenizer: Tokenizer, load_s: float = 0.0):
        self.spec, self.net, self.tokenizer, self.load_s = spec, net, tokenizer, load_s

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
         units: dict[str, UnitConfig] | None = None, threads: int | None = None) -> Model:
    """Load MODEL (path, HF dir, `smollm2-135m`, `synthetic:NAME`) with every unit at `dtype` on
    `device`, unless `units` (from a Plan) says otherwise per unit."""
    precision = PRECISION_NAMES.get(dtype)
    if precision is None:
        raise HeteroError(f"unknown dtype {dtype!r}; known: fp32, bf16, fp16, int8, int4")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HeteroError(f"device {device} requested but CUDA is not available here")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    src = resolve(model)
    from hetero.model.sources import resolve_spec

    spec = resolve_spec(model)
    store = WeightStore(src, spec)
    net = LlamaModel(spec, required(store), units, UnitConfig(device, precision))
    eos = None
    tok = load_tokenizer(src, spec.vocab_size, eos)
    return Model(spec, net, tok, time.perf_counter() - t0)
