"""Distillation on synthetic:tiny: a shallower student, a loss that falls, resumable checkpoints."""
from __future__ import annotations

import pytest
import torch

from hetero.compress.core import build_net, load_model
from hetero.compress.distill import distill, kept_layers
from hetero.compress.methods import Options
from hetero.errors import HeteroError


def test_kept_layers_are_evenly_spaced_with_both_ends():
    assert kept_layers(30, 20)[0] == 0 and kept_layers(30, 20)[-1] == 29 and len(kept_layers(30, 20)) == 20
    assert kept_layers(3, 2) == [0, 2]
    with pytest.raises(HeteroError):
        kept_layers(4, 5)


def test_student_trains_and_resumes_from_its_checkpoint(tmp_path):
    loaded = load_model("synthetic:tiny")
    opts = Options(layers=1, steps=3, calib_tokens=512, progress=False, checkpoint_dir=str(tmp_path))
    t1, spec1, info1 = distill(loaded, opts, seq_len=64, lr=1e-3, alpha=0.0, save_every=3, checkpoint_dir=tmp_path)
    assert spec1.n_layers == 1 and "model.layers.1.mlp.up_proj.weight" not in t1
    assert len(list(tmp_path.glob("distill-*.pt"))) == 1
    # Asking for more steps continues the same run from step 3.
    opts.steps = 12
    t2, _, info2 = distill(loaded, opts, seq_len=64, lr=1e-3, alpha=0.0, save_every=3, checkpoint_dir=tmp_path)
    assert [r[0] for r in info2["log"]] == list(range(1, 13))
    assert info2["log"][:3] == info1["log"]
    assert info2["log"][8][2] < info2["log"][0][2]  # KL to the teacher falls (same sequence: 8 per cycle)
    net = build_net(spec1, t2)  # the result runs in hetero
    ids = torch.arange(3, 40).unsqueeze(0)
    assert torch.isfinite(net(ids, 0, net.new_cache(1, 40), last_only=False)).all()
