from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hetero import cli
from hetero.errors import HeteroError
from hetero.hardware import bench, machine, profile
from hetero.hardware.catalog import resolve
from hetero.hardware.inventory import host_name


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(autouse=True)
def tiny_quick(monkeypatch, tiny):
    monkeypatch.setattr(bench, "QUICK", tiny)
    monkeypatch.setattr(bench, "FULL", tiny)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_devices_json(capsys):
    code, out, _ = run(capsys, "devices", "--json")
    assert code == 0
    names = [d["name"] for d in json.loads(out)["devices"]]
    assert names[0] == "cpu" and names[-1] == "disk"


def test_devices_table(capsys):
    code, out, _ = run(capsys, "devices")
    assert code == 0 and "cpu" in out and "disk" in out


def test_profile_json_then_cached_table(capsys):
    code, out, _ = run(capsys, "profile", "--quick", "--refresh", "--json")
    assert code == 0
    d = json.loads(out)
    assert "cpu" in d["devices"] and d["disk_direct"]["median"] > 0
    code, out, _ = run(capsys, "profile", "--quick")
    assert code == 0 and "GEMM bf16" in out and ("O_DIRECT" in out or "fadvise" in out)


def test_profile_warns_on_a_corrupt_cache(capsys, cache):
    path = cache / "profiles" / f"{host_name()}.json"
    path.parent.mkdir(parents=True)
    path.write_text("garbage")
    code, out, err = run(capsys, "profile", "--quick", "--json")
    assert code == 0 and "warning:" in err and "re-measuring" in err
    json.loads(out)


def test_catalog_list_and_compose(capsys):
    code, out, _ = run(capsys, "catalog", "--json")
    assert code == 0 and "h200" in json.loads(out)
    code, out, _ = run(capsys, "catalog", "catalog:rtx4090+ram64g+nvme", "--json")
    assert code == 0 and [d["name"] for d in json.loads(out)["devices"]] == ["cpu", "cuda:0", "disk"]
    code, out, _ = run(capsys, "catalog")
    assert code == 0 and "rtx4090" in out


def test_unknown_catalog_name_is_one_line_exit_2():
    # a real process: the user sees one line on stderr, no traceback
    r = subprocess.run([sys.executable, "-m", "hetero.cli", "catalog", "rtx9999"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown catalog part 'rtx9999'") and "rtx4090" in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_machine_entry_points(tmp_path, monkeypatch, tiny):
    spec, prof = machine("catalog:l4+ram32g")
    assert prof is None and spec.device("cuda:0").memory_bytes == 24 * 10**9
    assert machine("l4+ram32g")[0] == spec
    path = tmp_path / "box.json"
    path.write_text(json.dumps(resolve("rtx3090").to_dict()))
    assert machine(str(path)) == (resolve("rtx3090"), None)
    real = profile.measure
    monkeypatch.setattr(profile, "measure", lambda s, quick=True, progress=True, sizes=None:
                        real(s, quick=quick, progress=False, sizes=tiny))
    # the isolated measurement's child would measure at full size (~40 s): measure here, tiny
    monkeypatch.setattr(profile, "get_profile_isolated", lambda: profile.get_profile(progress=False))
    spec, prof = machine("this")
    assert spec.source == "this" and prof is not None and "cpu" in prof.devices


@pytest.mark.parametrize("bad", ["nonsense", "/no/such/file.json"])
def test_machine_rejects_unknown(bad):
    with pytest.raises(HeteroError):
        machine(bad)


def test_machine_rejects_a_bad_json_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"host": "x"}')
    with pytest.raises(HeteroError, match="not a HardwareSpec"):
        machine(str(p))
