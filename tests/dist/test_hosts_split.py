"""The hosts file and the cost-model stage split (pure: no processes, no weights)."""
from __future__ import annotations

import itertools
import textwrap
import time
import json

import pytest
import yaml

from hetero.dist.hosts import catalog_hosts, hosts_to_dict, load_hosts, local_hosts, parse_hosts, parse_rate
from hetero.dist.split import rank_speeds, split_model
from hetero.errors import HeteroError
from hetero.model.sources import resolve_spec

HOSTS = """
hosts:
  - address: 10.0.0.1
    ranks: 2
    hardware: desktop
    memory: 8GB
  - address: 10.0.0.2
    hardware: catalog:server
    devices: [cpu]
links:
  default: {bandwidth: 10gbe}
  local: {bandwidth: 20GB/s, latency: 5us}
  between:
    - {hosts: [10.0.0.1, 10.0.0.2], bandwidth: 100Gbit/s, latency: 20us}
port: 29511
"""


def test_hosts_file_round_trip(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text(HOSTS)
    h = load_hosts(p)
    assert h.world_size == 3 and h.master == "10.0.0.1" and h.port == 29511
    a, _, b = h.rank_hosts()
    assert a.memory == 8 * 10**9 and a.hardware == "catalog:desktop" and b.devices == ("cpu",)
    assert h.link(a, a).bandwidth == 20e9 and h.link(a, a).latency_s == pytest.approx(5e-6)
    assert h.link(a, b).bandwidth == 100e9 / 8 and h.link(a, b).latency_s == pytest.approx(20e-6)
    back = parse_hosts(json.loads(json.dumps(hosts_to_dict(h))))
    assert back.hosts == h.hosts and back.port == h.port
    for x, y in [(a, a), (a, b), (b, b)]:
        assert (back.link(x, y).bandwidth, back.link(x, y).latency_s) == (h.link(x, y).bandwidth, h.link(x, y).latency_s)


@pytest.mark.parametrize("text,rate", [("10gbe", 1.25e9), ("10Gbit/s", 1.25e9), ("10Gbps", 1.25e9),
                                       ("1.25GB/s", 1.25e9), (3e9, 3e9), ("100gbe", 12.5e9)])
def test_rates(text, rate):
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("data,needle", [
    ({}, "needs `hosts:`"),
    ({"hosts": [{"ranks": 1}]}, "needs an `address`"),
    ({"hosts": [{"address": "a", "ranks": 0}]}, "ranks must be a positive integer"),
    ({"hosts": ["a"], "links": {"between": [{"hosts": ["a", "zz"], "bandwidth": "10gbe"}]}}, "'zz', which is not a host"),
    ({"hosts": ["a"], "links": {"default": {"bandwidth": "fast"}}}, "bad bandwidth"),
    ({"hosts": ["a", "a"]}, "listed twice"),
])
def test_bad_hosts_files_are_one_clear_error(data, needle):
    with pytest.raises(HeteroError, match=needle):
        parse_hosts(data)


def test_unreadable_yaml(tmp_path):
    p = tmp_path / "h.yaml"
    p.write_text("hosts: [a, b\n")
    with pytest.raises(HeteroError, match="not valid YAML"):
        load_hosts(p)


def _bottleneck(s):
    return max(x.step_s + x.send_s for x in s.stages)


def test_split_is_the_exact_optimum_over_all_cuts():
    # synthetic:llama-1b: 24 units (embed, 22 layers, head) over 3 unequal catalog hosts.
    spec = resolve_spec("synthetic:llama-1b")
    h = catalog_hosts(["desktop", "laptop16g", "server"], "10gbe")
    speeds = rank_speeds(h)
    best = split_model(spec, h, speeds, "bf16", in_flight=3)
    brute = min(_bottleneck(split_model(spec, h, speeds, "bf16", in_flight=3, layers=[a, b, 22 - a - b]))
                for a, b in itertools.product(range(23), repeat=2) if a + b <= 22)
    assert _bottleneck(best) == pytest.approx(brute, rel=1e-12)
    # the fast server gets the most layers, the laptop the fewest: sized by speed, not equal counts
    n = best.layer_counts()
    assert n[2] > n[0] > n[1] and sum(n) == 22
    assert [s.first for s in best.plan_stages()][0] == "embed" and best.plan_stages()[-1].last == "head"


def test_split_respects_memory_and_says_when_nothing_fits():
    spec = resolve_spec("synthetic:llama-1b")  # bf16 layer ~88 MB; the whole model ~2.2 GB
    free = split_model(spec, catalog_hosts(["desktop", "desktop"], "10gbe"),
                       rank_speeds(catalog_hosts(["desktop", "desktop"], "10gbe")), "bf16")
    h = parse_hosts({"hosts": [{"address": "a", "hardware": "desktop", "memory": "0.7GB"},
                               {"address": "b", "hardware": "desktop"}]})
    tight = split_model(spec, h, rank_speeds(h), "bf16")
    s0 = tight.stages[0]
    assert s0.weight_bytes + s0.kv_bytes <= 0.7e9
    assert tight.layer_counts()[0] < free.layer_counts()[0]
    h2 = parse_hosts({"hosts": [{"address": "a", "hardware": "desktop", "memory": "0.5GB"},
                                {"address": "b", "hardware": "desktop", "memory": "0.5GB"}]})
    with pytest.raises(HeteroError, match="does not fit"):
        split_model(spec, h2, rank_speeds(h2), "bf16")


def test_what_if_links_and_hosts():
    spec = resolve_spec("synthetic:llama-7b")
    pred = {}
    for n, ln in itertools.product((2, 4), ("10gbe", "100gbe")):
        h = catalog_hosts(["desktop"] * n, ln)
        pred[n, ln] = split_model(spec, h, rank_speeds(h), "bf16", in_flight=n, prompt_tokens=512, context=1024).predict()
    # the prompt's activations (512 x 4096 fp32 = 8 MB a hop) are where the link shows
    assert pred[2, "100gbe"]["prefill_tok_s"] > pred[2, "10gbe"]["prefill_tok_s"]
    # with a micro-batch per stage in flight, more hosts = more throughput; one sequence alone gains nothing
    assert pred[4, "10gbe"]["throughput_tok_s"] > 1.5 * pred[2, "10gbe"]["throughput_tok_s"]
    assert pred[4, "10gbe"]["decode_tok_s"] <= pred[2, "10gbe"]["decode_tok_s"]


def test_fixed_layers_must_add_up():
    spec = resolve_spec("synthetic:tiny")
    h = local_hosts(2)
    with pytest.raises(HeteroError, match="summing to 2"):
        split_model(spec, h, rank_speeds(h), layers=[2, 1])
    assert split_model(spec, h, rank_speeds(h), layers=[0, 2]).stages[0].units == ("embed",)


def test_dist_plan_cli_json():
    from typer.testing import CliRunner

    from hetero.cli import app

    r = CliRunner().invoke(app, ["dist-plan", "synthetic:llama-7b", "--hardware", "desktop,desktop,desktop",
                                 "--link", "10gbe,100gbe", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [o["link"] for o in out] == ["10gbe", "100gbe"]
    assert sum(s["units"].__len__() for s in out[0]["stages"]) == 34
    assert out[1]["predicted"]["prefill_tok_s"] > out[0]["predicted"]["prefill_tok_s"] > 0


def test_yaml_example_in_docstring_parses():
    import hetero.dist.hosts as mod

    doc = mod.__doc__
    text = doc[doc.index("hosts:"):doc.index("Ranks are numbered")]
    h = parse_hosts(yaml.safe_load(textwrap.dedent("    " + text)))
    assert h.world_size == 2 and h.hosts[0].memory == 8 * 10**9


def test_named_gpus_are_one_per_rank_and_not_shared():
    from hetero.dist.pipeline import rank_devices

    h = parse_hosts({"hosts": [{"address": "a", "ranks": 2, "hardware": "2xrtx4090", "devices": ["cuda:0", "cuda:1"]},
                               {"address": "b", "hardware": "desktop"}]})
    sp = rank_speeds(h)
    assert [s.device for s in sp] == ["cuda:0", "cuda:1", "cpu"]
    assert rank_devices(h) == ["cuda:0", "cuda:1", ""]
    assert sp[0].rates.gemv == sp[1].rates.gemv  # each rank has a GPU of its own: no sharing discount
    assert sp[0].memory == 24 * 10**9
    shared = rank_speeds(parse_hosts({"hosts": [{"address": "a", "ranks": 2, "hardware": "desktop"}]}))
    alone = rank_speeds(parse_hosts({"hosts": [{"address": "a", "hardware": "desktop"}]}))
    assert shared[0].rates.gemv["bf16"] == pytest.approx(alone[0].rates.gemv["bf16"] / 2)


def test_watchdog_ends_a_silent_process():
    import subprocess
    import sys

    code = "from hetero.dist.comm import Watchdog; import time; w = Watchdog(3, 1.0); time.sleep(30)"
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "error: rank 3: no progress for" in p.stderr
    assert time.monotonic() - t < 30
