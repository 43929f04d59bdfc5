"""`hetero finetune` end to end on a tiny model: the adapter, resume, --adapter in eval; bad data and
bad adapters get one line, exit 2, and nothing written."""
from __future__ import annotations

import json

import pytest

from tests.cli import assert_clean_error, run_cli
from tests.model.helpers import write_tiny_checkpoint

TEXT = ("The licensee may copy and distribute verbatim copies of the program's source code. " * 60)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-ft")
    write_tiny_checkpoint("llama", d)
    return str(d)


def _train(model, data, out, capsys, *extra):
    return run_cli(["finetune", model, "--data", str(data), "-o", str(out), "--seq-len", "32", "--batch", "2",
                    "--lr", "3e-3", "--rank", "4", "--precisions", "fp32", "--json", *extra], capsys)


def test_finetune_resume_and_eval(model, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    code, out, err = _train(model, data, tmp_path / "a", capsys, "--steps", "6", "--save-every", "3",
                            "--schedule", "constant")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["loss_last"] < rec["loss_first"]          # it learns the repeated sentence
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4
    full = json.loads((tmp_path / "a" / "hetero_training.json").read_text())["log"]
    # a run stopped at step 3 and resumed to 6 follows the same curve
    # (a constant rate: a cosine's rate at a step depends on the total asked for)
    code, _, err = _train(model, data, tmp_path / "b", capsys, "--steps", "3", "--schedule", "constant")
    assert code == 0, err
    code, _, err = _train(model, data, tmp_path / "b", capsys, "--steps", "6", "--resume", "--schedule", "constant")
    assert code == 0, err
    resumed = json.loads((tmp_path / "b" / "hetero_training.json").read_text())["log"]
    assert [r[:2] for r in resumed] == [r[:2] for r in full]
    # other settings do not resume
    code, _, err = _train(model, data, tmp_path / "b", capsys, "--steps", "7", "--resume", "--rank", "2",
                          "--schedule", "constant")
    assert_clean_error(code, err, "other settings")
    code, out, err = run_cli(["eval", model, "--text", str(data), "--context", "32", "--tokens", "256",
                              "--no-progress", "--json"], capsys)
    base = json.loads(out)["perplexity"]
    code, out, err = run_cli(["eval", model, "--text", str(data), "--context", "32", "--tokens", "256",
                              "--no-progress", "--json", "--adapter", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert json.loads(out)["perplexity"] < base


def test_dry_run_shows_training_plan(model, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    code, out, err = run_cli(["finetune", model, "--data", str(data), "--dry-run", "--json", "--seq-len", "32",
                              "--checkpointing"], capsys)
    assert code == 0, err
    rec = json.loads(out)
    assert rec["checkpointing"] is True and rec["predicted_step_s"] > 0
    assert rec["training_memory"]["adamw"] == 2 * rec["training_memory"]["adapters"]


@pytest.mark.parametrize("body,needle", [
    ("", "empty"),
    ('{"text": "fine"}\nnot json at all\n', ":2: not JSON"),
    ('{"text": "fine"}\n{"txt": "no text field"}\n', ":2: expected an object"),
])
def test_bad_data_is_one_line(model, tmp_path, capsys, body, needle):
    data = tmp_path / "d.jsonl"
    data.write_text(body)
    code, _, err = _train(model, data, tmp_path / "a", capsys, "--steps", "1")
    assert_clean_error(code, err, needle)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob("a.*"))


def test_long_examples_truncated_with_a_note(model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "short one"}) + "\n" + json.dumps({"text": TEXT}) + "\n")
    code, _, err = _train(model, data, tmp_path / "a", capsys, "--steps", "1")
    assert code == 0, err
    assert "truncated" in err and "line 2" in err


def test_wrong_adapter_is_refused(model, tmp_path, capsys):
    other = tmp_path / "other"
    write_tiny_checkpoint("mistral_gqa", other)
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    code, _, err = _train(str(other), data, tmp_path / "a", capsys, "--steps", "1")
    assert code == 0, err
    code, _, err = run_cli(["eval", model, "--text", str(data), "--adapter", str(tmp_path / "a")], capsys)
    assert_clean_error(code, err, "trained for")
    code, _, err = run_cli(["compress", model, "--adapter", str(tmp_path / "a"), "-o", str(tmp_path / "m")], capsys)
    assert_clean_error(code, err, "trained for")
    assert not (tmp_path / "m").exists()


def test_learning_rate_warms_up_then_follows_a_cosine():
    from hetero.errors import HeteroError
    from hetero.finetune.train import TrainConfig

    c = TrainConfig(steps=100, lr=1e-3, warmup=5)
    lrs = [c.lr_at(s) for s in range(100)]
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])       # linear warm-up to the peak
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))                  # then only down
    assert lrs[52] == pytest.approx(5e-4, rel=0.02) and lrs[-1] < 1e-5    # half way: half; the end: ~0
    assert TrainConfig(steps=10, lr=1e-3, schedule="constant").lr_at(7) == 1e-3
    with pytest.raises(HeteroError, match="--schedule"):
        TrainConfig(schedule="linear")
