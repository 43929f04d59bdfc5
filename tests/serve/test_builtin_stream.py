"""The built-in model served in-process: a streamed chat completion is the engine's greedy run (the
generation `hetero run` makes), token for token, one event per token."""
from __future__ import annotations

import pytest

import hetero
from hetero.serve.app import create_app

from .helpers import Server

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def builtin():
    m = hetero.load(MODEL, dtype="fp32")  # a fixed plan: built straight from the weights, no conversion
    with Server(create_app(m.engine, model_id=MODEL)) as srv:
        yield srv, m
    m.close()


def test_streamed_chat_is_the_greedy_run_token_for_token(builtin):
    srv, m = builtin
    msgs = [{"role": "user", "content": "Write one sentence in French with accents, then an emoji."}]
    direct = list(m.engine.stream(msgs, max_new_tokens=16, temperature=0.0, chat=True))
    chunks = list(srv.client().chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))
    deltas = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert deltas == [r.text for r in direct if r.text]  # the same text, split the same way
    assert "".join(deltas) == m.tokenizer.decode([t for r in direct for t in r.token_ids])
    assert chunks[-1].usage.completion_tokens == sum(len(r.token_ids) for r in direct)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        [direct[-1].finish_reason]
