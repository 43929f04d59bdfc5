"""The sensitivity table: measured per unit and precision, in the format the planner loads."""
from __future__ import annotations

import json

from hetero.compress.core import load_model
from hetero.compress.sensitivity import measure
from hetero.plan.sensitivity import load_sensitivity, quality_table


def test_table_is_measured_per_unit_and_loads_in_the_planner(tmp_path, capsys):
    from hetero.cli import main

    out = tmp_path / "sens.json"
    try:
        main(["sensitivity", "synthetic:tiny", "-o", str(out), "--tokens", "256", "--context", "128",
              "--precisions", "bf16,int8,int4", "--no-progress"])
    except SystemExit as e:
        assert not e.code
    data = json.loads(out.read_text())
    loaded = load_model("synthetic:tiny")
    units = loaded.spec.unit_names()
    assert sorted(data["units"]) == sorted(units)
    table = load_sensitivity(out)
    assert set(table) == {(u, p) for u in units for p in ("bf16", "int8", "int4")}
    assert all(c >= 0 for c in table.values())
    # Coarser grids cost more: int4 > int8 on every decoder layer and the head.
    for u in units[1:]:
        assert table[(u, "int4")] > table[(u, "int8")] > 0
    # The planner takes measured pairs over its default.
    q = quality_table(loaded.spec, ["int4"], table)
    assert q[("layers.0", "int4")] == table[("layers.0", "int4")]


def test_measure_selected_units_only():
    loaded = load_model("synthetic:tiny")
    ids = list(range(3, 200))
    data = measure(loaded, ids, ("int8",), context=64, units=["head"], progress=False)
    assert list(data["units"]) == ["head"] and data["meta"]["tokens"] == len(ids) - 1
