"""The package's layers point one way: commands -> serve/bench/dist -> runtime -> model -> ops.
Checked on the source (every import statement, at any depth), so a lazy import cannot hide a cycle."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hetero"

# package -> packages of hetero it must never import
FORBIDDEN = {
    "ops": ("hetero.model", "hetero.runtime", "hetero.plan", "hetero.serve", "hetero.bench", "hetero.dist",
            "hetero.commands", "hetero.compress"),
    "model": ("hetero.runtime", "hetero.plan", "hetero.serve", "hetero.bench", "hetero.dist", "hetero.commands"),
    "plan": ("hetero.runtime", "hetero.serve", "hetero.bench", "hetero.dist", "hetero.commands", "hetero.ops",
             "torch"),
}


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports_point_down(package):
    bad = []
    for f in sorted((SRC / package).rglob("*.py")):
        for name in imports(f):
            if any(name == b or name.startswith(b + ".") for b in FORBIDDEN[package]):
                bad.append(f"{f.relative_to(SRC)} imports {name}")
    assert not bad, "\n".join(bad)


def test_checker_sees_imports(tmp_path):
    # the checker itself must catch a nested, lazy import
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from hetero.runtime import engine\n")
    assert "hetero.runtime" in imports(f)
