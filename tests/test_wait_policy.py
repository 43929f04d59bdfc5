"""The CLI's OpenMP wait policy: threads sleep only when other work is running now."""
from __future__ import annotations

import os

import pytest

from hetero import cli


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(cli.sys, "modules", {k: v for k, v in cli.sys.modules.items() if k != "torch"})
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda _pid: {0, 1})
    return monkeypatch


@pytest.mark.parametrize("others, passive", [(0, False), (1, False), (2, True), (5, True)])
def test_passive_only_when_other_threads_fill_the_cores(env, others, passive):
    env.setattr(cli, "_others_running", lambda: others)
    env.setattr(cli.os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # a busy past minute alone does not count
    cli._wait_policy(["bench"])
    assert (os.environ.get("OMP_WAIT_POLICY") == "PASSIVE") is passive


def test_a_users_policy_is_kept(env):
    env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    env.setattr(cli, "_others_running", lambda: 8)
    cli._wait_policy(["serve", "smollm2-135m"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_others_running_reads_proc_stat():
    n = cli._others_running(samples=2, gap_s=0.0)
    if not os.path.exists("/proc/stat"):
        assert n is None
    else:
        assert isinstance(n, int) and n >= 0


@pytest.mark.parametrize("args, spin", [(["serve", "m"], True), (["serve", "m", "--no-batching"], False),
                                        (["run", "m"], False)])
def test_a_batching_server_spins_briefly_on_a_quiet_machine(env, args, spin):
    # its worker, event loop and clients share the engine's cores each step (docs/BENCHMARKS.md, "Serving")
    env.setattr(cli, "_others_running", lambda: 0)
    cli._wait_policy(args)
    assert "OMP_WAIT_POLICY" not in os.environ
    assert (os.environ.get("GOMP_SPINCOUNT") == str(cli.SERVE_SPINCOUNT)) is spin
