#!/usr/bin/env bash
# Builds llama.cpp's own server (llama-server) from the llama.cpp source vendored in the
# llama-cpp-python sdist of the installed version, so the peer server and the peer library
# are the same llama.cpp. Only the llama-server target; idempotent (an existing binary of the
# same version is kept).
#   usage: benchmarks/build_llama_server.sh [PYTHON]   -> prints the binary's path
set -euo pipefail
PY=${1:-${PY:-.venv/bin/python}}
JOBS=${JOBS:-2}
PEERS=${HETERO_PEERS_DIR:-$HOME/.cache/hetero/peers}
command -v cmake >/dev/null || { echo "build_llama_server: cmake not found (install cmake)" >&2; exit 1; }
VER=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')
OUT="$PEERS/llama-server-$VER"
BIN="$OUT/bin/llama-server"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
SRC="$PEERS/src"
mkdir -p "$SRC"
SDIST="$SRC/llama_cpp_python-$VER.tar.gz"
if [ ! -f "$SDIST" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$SRC" >&2
fi
TREE="$SRC/llama_cpp_python-$VER"
[ -d "$TREE/vendor/llama.cpp/tools/server" ] || tar -xzf "$SDIST" -C "$SRC"
LCPP="$TREE/vendor/llama.cpp"
BUILD="$SRC/build-$VER"
# Native CPU build, no curl (the peer reads local files only), no tests/examples beyond the server.
cmake -S "$LCPP" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON >&2
cmake --build "$BUILD" --config Release --target llama-server -j "$JOBS" >&2
mkdir -p "$OUT/bin"
# Copy to a temporary name first so an interrupted copy never leaves a half binary behind.
cp "$BUILD/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
