"""Pipelines of real rank processes over gloo on loopback: same tokens as one process, each rank holds
only its stage, and a dead or stalled rank ends the run with an error naming it — never a hang."""
from __future__ import annotations

import json
import signal
import time

import pytest
import torch

import hetero
from hetero.dist.hosts import local_hosts
from hetero.dist.launch import LocalRun
from hetero.dist.pipeline import Job
from hetero.errors import HeteroError

pytestmark = pytest.mark.dist


def one_process(m, prompts: list[list[int]], n: int, batch: bool = False) -> list[list[int]]:
    """Greedy tokens from the one-process model (hetero.load): the generation loop, or a batch through net."""
    from hetero.runtime.generate import stream_generate

    if not batch:
        return [[t for r in stream_generate(m.net, m.tokenizer, p, n, stop_ids=set()) for t in r.token_ids]
                for p in prompts]
    ids = torch.tensor(prompts)
    cache = m.net.new_cache(len(prompts), ids.shape[1] + n)
    logits, out, pos = m.net(ids, 0, cache), [], ids.shape[1]
    for _ in range(n):
        nxt = logits.argmax(-1)
        out.append(nxt.tolist())
        logits = m.net(nxt.view(-1, 1), pos, cache)
        pos += 1
    return [list(x) for x in zip(*out)]


def _one_process_model(name: str):
    """hetero.load's model (Decoder, whole), its GGUF tensors read in one pass (hetero.load reopens the
    file per tensor: ~30 s on this busy machine, for identical weights)."""
    from hetero.dist.stage import stage_weights
    from hetero.runtime.api import Model
    from hetero.model.decoder import Decoder
    from hetero.model.sources import resolve, resolve_spec
    from hetero.model.tokenizer import load_tokenizer

    torch.set_num_threads(1)  # ranks run one thread each: the same reduction order
    spec, src = resolve_spec(name), resolve(name)
    net = Decoder.build(spec, stage_weights(src, spec, tuple(spec.unit_names())))
    return Model(spec, net, load_tokenizer(src, spec.vocab_size, None))


@pytest.fixture(scope="module")
def tiny_run():
    from typer.testing import CliRunner

    from hetero.cli import app

    # 2 + 1 sequences: "hello" twice shares a micro-batch of 2; the third prompt is longer, so alone
    r = CliRunner().invoke(app, ["pipeline", "synthetic:tiny", "--ranks", "2", "-p", "hello", "-p", "hello",
                                 "-p", "a longer prompt here", "-n", "12", "--micro-batch", "2", "--json", "--dtype", "fp32",
                                 "--timeout", "10"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_tiny_tokens_match_one_process(tiny_run):
    ids = [s["token_ids"] for s in tiny_run["sequences"]]
    m = hetero.load("synthetic:tiny", threads=1)  # ranks run one thread each: the same reduction order
    prompts = [m.prompt_ids(p) for p in ("hello", "hello", "a longer prompt here")]
    assert [s["prompt_tokens"] for s in tiny_run["sequences"]] == [len(p) for p in prompts]
    assert tiny_run["micro_batches"] == 2
    assert ids[2] == one_process(m, [prompts[2]], 12)[0]
    assert ids[:2] == one_process(m, prompts[:2], 12, batch=True)
    assert all(len(x) == 12 or s["finish_reason"] == "stop" for x, s in zip(ids, tiny_run["sequences"]))


def test_each_rank_holds_only_its_stage(tiny_run):
    ranks = tiny_run["ranks"]
    assert [r["units"] for r in ranks] == [f"{s['first']}..{s['last']}" for s in tiny_run["split"]["stages"]]
    for r in ranks:  # counted tensor by tensor in the rank, against the plan's sizes of its units
        units = r["layers"] + 1  # + the embedding (rank 0) or the head (rank 1)
        # each unit is read from the tensor cache into one buffer, padded to the cache's alignment
        assert r["planned_weight_bytes"] <= r["weight_bytes"] < r["planned_weight_bytes"] + units * 64 * 1024
        assert r["weight_bytes"] < 0.8 * tiny_run["full_weight_bytes"]
        assert r["choices"] == ["cpu/fp32/resident"] and r["over_budget"] == {}
    assert sum(r["planned_weight_bytes"] for r in ranks) == tiny_run["full_weight_bytes"]  # tiny's head is untied
    assert [(s["first"], s["last"]) for s in tiny_run["plan"]["stages"]] == \
        [(s["first"], s["last"]) for s in tiny_run["split"]["stages"]]


def _start(env_delay: str = "0.05", timeout: float = 3.0) -> LocalRun:
    job = Job(prompts=[[1, 2, 3]] * 4, max_new_tokens=400, ignore_stop=True)
    return LocalRun("synthetic:tiny", local_hosts(2), job, timeout=timeout,
                    env={"HETERO_DIST_STEP_DELAY": env_delay, "HETERO_DIST_LOG": "1"})


def _wait_generating(run: LocalRun, limit: float = 60.0) -> None:
    t = time.monotonic()
    while "micro-batch" not in run.stderr(0):
        assert time.monotonic() - t < limit, "the pipeline never started generating"
        assert all(p.poll() is None for p in run.procs), run.stderr(0) + run.stderr(1)
        time.sleep(0.1)


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_rank_ends_the_run_with_its_name(victim):
    run = _start()
    try:
        _wait_generating(run)
        run.procs[victim].send_signal(signal.SIGKILL)
        t = time.monotonic()
        other = run.procs[1 - victim]
        other.wait(timeout=3.0 + 10)
        took = time.monotonic() - t
        err = run.stderr(1 - victim)
        assert other.returncode == 2, err
        assert f"error: rank {victim} (127.0.0.1) exited or crashed; rank {1 - victim} stopped" in err
        assert took < 3.0 + 2  # well within the timeout: the dead peer's socket closes at once
        assert "Traceback" not in err
        with pytest.raises(HeteroError, match=f"rank {victim} .*killed by signal 9"):
            run.wait()
    finally:
        run.kill()
        run.close()


def test_stalled_rank_is_named_within_the_timeout():
    run = _start(timeout=3.0)
    try:
        _wait_generating(run)
        run.procs[1].send_signal(signal.SIGSTOP)  # alive but silent: a stalled link looks the same
        t = time.monotonic()
        run.procs[0].wait(timeout=3.0 + 10)
        took = time.monotonic() - t
        assert run.procs[0].returncode == 2
        assert "error: rank 1 (127.0.0.1) sent nothing for 3 s" in run.stderr(0)
        assert 2.5 < took < 3.0 + 5
    finally:
        run.kill()
        run.close()


@pytest.mark.slow
def test_smollm2_tokens_and_memory():
    from hetero.dist import generate

    prompts = ["What is the capital of France?", "Name three colours."]
    res = generate("smollm2-135m", local_hosts(2), prompts, max_new_tokens=12, timeout=30, ignore_stop=True,
                   precisions=["fp32"])  # the planner at fp32 only: the one-process reference below
    m = _one_process_model("smollm2-135m")
    ref = one_process(m, [m.prompt_ids(p) for p in prompts], 12)
    assert [s["token_ids"] for s in res["sequences"]] == ref
    full = res["full_weight_bytes"]  # fp32, the tied embedding counted once
    for r in res["ranks"]:
        # each unit read from the tensor cache into one buffer, padded to the cache's alignment
        assert r["planned_weight_bytes"] <= r["weight_bytes"] < r["planned_weight_bytes"] + (r["layers"] + 1) * 65536
        assert r["weight_bytes"] < 0.8 * full
        # measured: the heap grew by this stage's weights (+ small change), not by the other stage's
        # (+ the tokenizer, which the engine loads in the same window; the other stage is ≥ 269 MB)
        assert r["anon_load_delta"] < r["weight_bytes"] + 80e6
    assert res["ranks"][0]["layers"] + res["ranks"][1]["layers"] == 30
