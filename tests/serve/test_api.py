"""The real `openai` client against a live server on a tiny model: completions, chat, streaming."""
from __future__ import annotations

import httpx
import openai
import pytest

from hetero.serve.app import create_app

from .helpers import Server

MODEL = "synthetic:tiny"


def test_models_lists_the_served_model(tiny_server):
    ids = [m.id for m in tiny_server.client().models.list()]
    assert ids == [MODEL]
    assert tiny_server.client().models.retrieve(MODEL).id == MODEL


def test_completion_counts_tokens_and_stops_at_max_tokens(tiny_server):
    prompt = "The capital of France is"
    r = tiny_server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    # The synthetic model has a byte-level tokenizer and no end-of-text token.
    assert r.usage.prompt_tokens == len(prompt.encode())
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == len(prompt.encode()) + 7
    assert r.choices[0].finish_reason == "length"
    assert isinstance(r.choices[0].text, str)


def test_greedy_and_seeded_sampling_reproduce(tiny_server):
    c = tiny_server.client()
    a = c.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0).choices[0].text
    b = c.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0).choices[0].text
    assert a == b
    kw = dict(model=MODEL, prompt="abc", max_tokens=12, temperature=1.5, top_p=0.95)
    s1 = c.completions.create(seed=7, **kw).choices[0].text
    s2 = c.completions.create(seed=7, **kw).choices[0].text
    s3 = c.completions.create(seed=8, **kw).choices[0].text
    assert s1 == s2
    assert s3 != s1  # a different seed gives a different sample (12 near-uniform random bytes)


def test_streamed_completion_matches_the_unstreamed_one(tiny_server):
    c = tiny_server.client()
    whole = c.completions.create(model=MODEL, prompt="hello", max_tokens=20, temperature=0)
    chunks = list(c.completions.create(model=MODEL, prompt="hello", max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == 5


def test_stop_sequence_cuts_the_text(tiny_server):
    c = tiny_server.client()
    full = c.completions.create(model=MODEL, prompt="stop here", max_tokens=40, temperature=0).choices[0].text
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    r = c.completions.create(model=MODEL, prompt="stop here", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_chat_completion_and_stream(tiny_server):
    c = tiny_server.client()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens > len("Hi there")
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_chat_accepts_text_parts_and_max_completion_tokens(tiny_server):
    c = tiny_server.client()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                  max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_health_plan_and_metrics(tiny_server):
    h = httpx.get(tiny_server.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["generated_tokens"] == 1
    plan = httpx.get(tiny_server.url + "/plan").json()
    engine = tiny_server.app.state.serve.engine
    assert plan == engine.plan.to_dict()  # the Plan being served, as `hetero plan -o` writes it
    assert plan["model"]["name"] == MODEL and plan["workload"]["context"] == 512  # the model's context
    assert [u["name"] for u in plan["units"]] == ["embed", "layers.0", "layers.1", "head"]
    # the engine runs what the plan says, unit by unit
    assert {u["name"]: (u["device"], u["precision"]) for u in plan["units"]} == \
        {n: (c.device, c.precision) for n, c in engine.model.net.units.items()}
    tiny_server.client().completions.create(model=MODEL, prompt="metrics", max_tokens=5, temperature=0)
    text = httpx.get(tiny_server.url + "/metrics").text
    assert "# TYPE hetero_time_to_first_token_seconds histogram" in text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['hetero_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert samples["hetero_generated_tokens_total"] >= 5
    assert samples["hetero_time_to_first_token_seconds_count"] >= 1
    assert samples["hetero_inter_token_latency_seconds_count"] >= 4
    assert samples["hetero_process_resident_bytes"] > 10e6
    assert samples['hetero_model_weight_bytes{device="cpu"}'] == sum(u["bytes"] for u in plan["units"])
    assert samples['hetero_budget_bytes{device="cpu"}'] == plan["budgets"]["cpu"]
    assert samples['hetero_footprint_peak_bytes{device="cpu"}'] >= samples["hetero_process_resident_bytes"] * 0.5


def test_report_is_the_engines_with_budgets(tiny_server):
    c = tiny_server.client()
    c.completions.create(model=MODEL, prompt="report", max_tokens=6, temperature=0)
    r = httpx.get(tiny_server.url + "/report").json()
    assert r["budget_bytes"] == tiny_server.app.state.serve.engine.plan.budgets
    assert r["measured"]["decode_tok_s"] > 0 and r["measured"]["footprint_bytes"]["cpu"] > 10e6
    assert r["predicted"]["decode_tok_s"] > 0
    assert isinstance(r["over_budget"], dict)


def test_chat_through_the_server_is_the_engines_greedy_text(tiny_server):
    engine = tiny_server.app.state.serve.engine
    msgs = [{"role": "user", "content": "Tell me about rivers"}]
    direct = "".join(rec.text for rec in engine.stream(msgs, max_new_tokens=12, temperature=0.0, chat=True))
    r = tiny_server.client().chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == direct and r.usage.completion_tokens == 12


def test_api_key_guards_every_route_but_health(tiny_engine):
    with Server(create_app(tiny_engine, api_key="s3cret")) as srv:
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").models.list()
        for path in ("/v1/models", "/metrics", "/plan"):
            r = httpx.get(srv.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        good = srv.client(api_key="s3cret")
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_unknown_route_is_an_error_object(tiny_server):
    r = httpx.get(tiny_server.url + "/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(tiny_server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
