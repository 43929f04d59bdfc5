#!/usr/bin/env bash
# One prepared check for a lent GPU machine (one H200, ~15 min of device time in all); not run on a GPU yet.
#
#   bash benchmarks/gpu_check.sh [--out FILE] [--dry-run] [--profile quick|none]
#
# Within ~8 minutes: the GPU tests (pytest -m gpu, plus the planner/engine contract test, whose CUDA
# choices then run on the GPU for real), then a partial-offload curve of synthetic:llama-1b (0, 25,
# 50, 75, 100% of the layers on cuda:0, bf16: predicted vs measured prefill and decode tok/s), all
# written to one JSON file: FILE, else $OUT/gpu_check.json, else ./gpu_check.json.
#
# The GPU machine has no network and no repo .venv: the script installs nothing and runs on that
# machine's python3 (PyTorch with CUDA, pytest, transformers, safetensors, scipy, psutil, typer,
# rich are in its image) with PYTHONPATH=src. Set PYTHON to use another interpreter.
# --dry-run: no CUDA needed, < 60 s; the same steps' CPU side (plans priced for catalog:h200, the
# measuring code on synthetic:tiny under a simulated CUDA, the output file's format).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=0; FILE=""; PROFILE=quick
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) [ $# -ge 2 ] || { echo "error: --out needs a path" >&2; exit 2; }; FILE="$2"; shift ;;
    --profile) [ $# -ge 2 ] || { echo "error: --profile needs quick or none" >&2; exit 2; }; PROFILE="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$PROFILE" in quick|none) ;; *) echo "error: --profile must be quick or none, not '$PROFILE'" >&2; exit 2 ;; esac
FILE="${FILE:-${OUT:-.}/gpu_check.json}"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || { echo "error: no python interpreter '$PY' (set PYTHON)" >&2; exit 2; }
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the tensor cache and synthetic weights go to scratch space, never into the repo
export HETERO_CACHE="${HETERO_CACHE:-${TMPDIR:-/tmp}/hetero-gpu-check-cache}"
WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)

if [ "$DRY" = 1 ]; then
  echo "dry run: pytest skipped (no GPU)" >"$WORK/pytest.log"; PRC=-1
  timeout 120 "$PY" benchmarks/gpu_check.py --dry-run --out "$FILE" --profile none \
    --pytest-rc "$PRC" --pytest-log "$WORK/pytest.log"
  exit $?
fi

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# 1. the GPU tests: only the folders that hold them (others import packages that image lacks); the
#    contract test runs whole, so its CUDA choices run on the GPU
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/runtime_engine/test_contract.py \
  >"$WORK/pytest.log" 2>&1; CRC=$?
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/hardware tests/runtime_engine \
  >>"$WORK/pytest.log" 2>&1; PRC=$?
if [ "$PRC" = 0 ] || [ "$PRC" = 5 ]; then PRC=$CRC; fi   # 5: no test selected is not a failure
grep -E "passed|failed|error" "$WORK/pytest.log" | tail -n 4
[ -d "${OUT:-/nonexistent}" ] && cp "$WORK/pytest.log" "$OUT/gpu_check_pytest.log"
# 2. the curve, in what is left of 8 minutes (weights are generated and converted on first use);
#    the JSON is rewritten after every point, so a run cut short still leaves what it measured
LEFT=$(( 480 - ($(date +%s) - START) )); [ "$LEFT" -gt 60 ] || LEFT=60
timeout "$LEFT" "$PY" benchmarks/gpu_check.py --out "$FILE" --profile "$PROFILE" \
  --pytest-rc "$PRC" --pytest-log "$WORK/pytest.log"
