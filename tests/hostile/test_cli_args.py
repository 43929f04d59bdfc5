"""Bad CLI arguments and odd paths from the 2026-12-01 campaign: each is one `error:` line, exit 2;
anything else that escapes a command is one `internal error (bug)` line, exit 1."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from tests.cli import assert_clean_error, run_cli


def test_an_unexpected_exception_is_one_bug_line_exit_1(monkeypatch, capsys):
    import hetero.model.sources as sources

    def boom(model):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(sources, "resolve_spec", boom)
    code, _, err = run_cli(["info", "synthetic:tiny"], capsys)
    assert code == 1 and err.strip() == "internal error (bug): ZeroDivisionError: division by zero", err


def test_hetero_debug_shows_the_traceback(monkeypatch, capsys):
    import hetero.model.sources as sources

    monkeypatch.setattr(sources, "resolve_spec", lambda m: 1 / 0)
    monkeypatch.setenv("HETERO_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run_cli(["info", "synthetic:tiny"], capsys)


@pytest.mark.parametrize("args,needle", [
    (["plan", "synthetic:tiny", "--max-quality-loss", "-1"], "--max-quality-loss"),
    (["run", "synthetic:tiny", "--threads", "-1", "-n", "1"], "--threads"),
    (["run", "synthetic:tiny", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["pipeline", "synthetic:tiny", "--ranks", "6"], "only 4 units"),
    (["pipeline"], "--ranks"),
])
def test_bad_numbers(args, needle, capsys):
    code, _, err = run_cli(args, capsys)
    assert_clean_error(code, err, needle)


@pytest.mark.parametrize("plan,needle", [
    ([1, 2], "JSON object"),
    ({"version": 1, "units": [], "model": {"name": "x"}, "budgets": {"cpu": -5}}, "negative"),
    ({"version": 1, "units": [], "model": {"name": "x"}, "workload": {"context": -1}}, "context"),
])
def test_bad_plan_files(plan, needle, tmp_path, capsys):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    code, _, err = run_cli(["run", "synthetic:tiny", "--plan", str(p), "-n", "1"], capsys)
    assert_clean_error(code, err, needle)


def test_binary_hosts_file(tmp_path, capsys):
    p = tmp_path / "hosts.yaml"
    p.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_cli(["pipeline", "synthetic:tiny", "--hosts", str(p)], capsys)
    assert_clean_error(code, err, "hosts file")


@pytest.mark.parametrize("kind", ["file", "readonly"])
def test_unusable_cache_dir(kind, tmp_path, monkeypatch, capsys):
    if kind == "readonly" and os.geteuid() == 0:
        pytest.skip("root writes into read-only dirs")
    target = tmp_path / "cache"
    if kind == "file":
        target.write_text("x")
    else:
        target.mkdir()
        target.chmod(0o500)
    monkeypatch.setenv("HETERO_CACHE", str(target))
    code, _, err = run_cli(["run", "synthetic:tiny", "-n", "1"], capsys)
    assert_clean_error(code, err, "cache dir")


@pytest.mark.parametrize("out", ["DIR", "/proc/hetero-plan.json"])
def test_plan_output_unwritable(out, tmp_path, capsys):
    code, _, err = run_cli(["plan", "synthetic:tiny", "-o", str(tmp_path) if out == "DIR" else out], capsys)
    assert_clean_error(code, err, "plan")
    assert not list(tmp_path.iterdir())


def test_bench_report_under_proc_fails_before_measuring(capsys):
    code, _, err = run_cli(["bench", "synthetic:tiny", "--report", "/proc/hetero-report"], capsys)
    assert_clean_error(code, err, "/proc")


def test_print_torchrun_single_quotes_the_prompt(tmp_path, capsys):
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("hosts:\n  - address: 10.0.0.1\n    ranks: 1\n  - address: 10.0.0.2\n    ranks: 1\n")
    prompt = "hi $(touch /tmp/pwned) `id`"
    code, out, err = run_cli(["pipeline", "synthetic:tiny", "--hosts", str(hosts), "--print-torchrun",
                              "-p", prompt], capsys)
    assert code == 0, err
    line = out.strip().splitlines()[0]
    assert shlex.quote(prompt) in line and f'"{prompt}"' not in line
    # What a shell would pass on: the prompt verbatim, nothing expanded.
    argv = shlex.split(line)
    assert argv[argv.index("-p") + 1] == prompt


def test_compress_force_replaces_only_an_artifact(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("do not lose")
    code, _, err = run_cli(["compress", "synthetic:tiny", "--method", "int8", "-o", str(other), "--force"], capsys)
    assert_clean_error(code, err, "not an artifact")
    assert (other / "thesis.tex").read_text() == "do not lose"
    code, _, err = run_cli(["compress", "synthetic:tiny", "--method", "int8", "-o", ".", "--force"], capsys)
    assert_clean_error(code, err, "current")
    art = tmp_path / "art"
    stale = tmp_path / ".art.partial-999999-abc"     # a killed run's leftovers (pid 999999 is gone)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    assert run_cli(["compress", "synthetic:tiny", "--method", "int8", "-o", str(art)], capsys)[0] == 0
    assert not stale.exists() and (art / ".hetero-artifact").is_file()
    # An artifact hetero wrote is replaced with --force.
    assert run_cli(["compress", "synthetic:tiny", "--method", "int8", "-o", str(art), "--force"], capsys)[0] == 0
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_fifo_model_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    p = subprocess.run([sys.executable, "-m", "hetero.cli", "info", str(fifo)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "not a regular file" in p.stderr and "Traceback" not in p.stderr


def test_a_prompt_with_invalid_utf8_bytes(tmp_path):
    p = subprocess.run([sys.executable, "-m", "hetero.cli", "run", "synthetic:tiny", "-n", "1", "-p",
                        b"a\xed\xa0\x80b".decode("utf-8", "surrogateescape")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "not valid UTF-8" in p.stderr and "Traceback" not in p.stderr


def test_plan_output_onto_a_device_or_fifo_is_refused_and_left_alone(tmp_path, capsys):
    import stat

    fifo = tmp_path / "out.fifo"     # stands in for /dev/null: a rename would replace the node itself
    os.mkfifo(fifo)
    code, _, err = run_cli(["plan", "synthetic:tiny", "-o", str(fifo)], capsys)
    assert_clean_error(code, err, "not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.parametrize("flag", ["--plan", "--hosts", "--sensitivity"])
def test_dev_zero_as_an_input_file_is_refused_at_once(flag, capsys):
    cmd = {"--plan": ["run", "synthetic:tiny", "-n", "1"], "--hosts": ["pipeline", "synthetic:tiny"],
           "--sensitivity": ["plan", "synthetic:tiny"]}[flag]
    code, _, err = run_cli([*cmd, flag, "/dev/zero"], capsys)
    assert_clean_error(code, err, "not a regular file")


def test_bench_report_never_replaces_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep")
    code, _, err = run_cli(["bench", "synthetic:tiny", "--report", str(tmp_path)], capsys)
    assert_clean_error(code, err, "report.md")
    assert (tmp_path / "notes.txt").read_text() == "keep"
