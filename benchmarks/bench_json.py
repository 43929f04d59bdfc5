"""The slow_bench checks' one way to run a benchmark script: it writes its result as JSON to a file
the check then reads (stdout stays free for the script's own table)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_json(tmp_path: Path, script: str, *args: str, out_flag: str = "--json", timeout: int = 1800) -> dict:
    """Run benchmarks/SCRIPT with ARGS and `OUT_FLAG FILE`; the JSON it wrote there."""
    out = tmp_path / (Path(script).stem + ".json")
    subprocess.run([sys.executable, str(HERE / script), *args, out_flag, str(out)], check=True, timeout=timeout)
    return json.loads(out.read_text())
