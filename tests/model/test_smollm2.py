"""End to end on the real built-in model (SmolLM2-135M-Instruct, GGUF Q4_1)."""
from __future__ import annotations

import warnings

import pytest
import torch

import hetero
from hetero.model.sources import builtin_path

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol():
    return hetero.load("smollm2-135m", dtype="fp32")


def test_answers_paris(smol):
    assert "Paris" in smol.generate(QUESTION, max_new_tokens=24)


def test_first_32_greedy_tokens_equal_transformers_on_same_gguf(smol):
    from transformers import AutoModelForCausalLM

    path = builtin_path("smollm2-135m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    # A prompt whose answer does not stop early, so all 32 positions are compared.
    prompt = smol.prompt_ids("Write a long story about a dragon who learns to cook.")
    ours = []
    for rec in smol.stream("Write a long story about a dragon who learns to cook.", max_new_tokens=32):
        ours += rec.token_ids
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    theirs = out[0, len(prompt):].tolist()
    assert len(ours) == 32
    assert ours == theirs


def test_stream_records_and_stop_string(smol):
    recs = list(smol.stream(QUESTION, max_new_tokens=24, stop=["Paris"]))
    assert recs[-1].finish_reason == "stop"
    text = "".join(r.text for r in recs)
    assert "Paris" not in text and recs[-1].prefill_tok_s > 0
    # a stop string spanning several tokens: none of its start is sent before it is recognised
    full = list(smol.stream(QUESTION, max_new_tokens=24))
    pieces = [r.text for r in full if r.text]
    stop = "".join(pieces[2:5]).strip()
    whole = "".join(pieces)
    recs = list(smol.stream(QUESTION, max_new_tokens=24, stop=[stop]))
    assert "".join(r.text for r in recs) == whole[:whole.find(stop)] and recs[-1].finish_reason == "stop"
    recs = list(smol.stream("Count from one to one hundred.", max_new_tokens=5))
    assert recs[-1].finish_reason == "length" and recs[-1].generated_tokens == 5


def test_seeded_sampling_reproduces(smol):
    a = smol.generate(QUESTION, max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=7)
    b = smol.generate(QUESTION, max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=7)
    assert a == b and a
