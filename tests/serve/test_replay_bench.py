"""benchmarks/serve_overhead.py --replay swaps the batch runner's model for ReplayNet, which must keep
up with the interface the runner calls (a missing method once made every replayed request fail)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from hetero.runtime.batch import BatchRunner
from hetero.runtime.kvcache import KVPool

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_overhead.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("serve_overhead", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_replay_net_drives_the_batch_runner(tiny_engine):
    net = tiny_engine.model.net
    ids = [5, 9, 2, 7]
    runner = BatchRunner(net, pool=KVPool(net, 8 << 20), max_batch=2)
    runner.model = load_bench().ReplayNet(net, ids)
    a = runner.add([1, 2, 3], max_new_tokens=6)
    b = runner.add([4, 5], max_new_tokens=3)
    out = runner.run()
    # greedy picks follow the replayed ids, one per sampled row, across both requests
    assert len(out[a]) == 6 and len(out[b]) == 3
    assert set(out[a]) | set(out[b]) <= set(ids)
