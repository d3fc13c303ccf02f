#!/usr/bin/env bash
# Set up the peers bench/serve_load.py drives (everything outside the repository, under /tmp):
#   llama-server  built from the llama.cpp vendored in llama-cpp-python -> /tmp/llama-build/bin/llama-server
#   vllm-mlx      a separate venv                                        -> /tmp/vllm-mlx-venv/bin/vllm-mlx
#   guidellm      a separate venv (optional: --client guidellm)          -> /tmp/guidellm-venv/bin/guidellm
# The mlx directories for mlx_lm.server / vllm-mlx are made by serve_load.py itself when missing
# (/tmp/bench_models/SmolLM2-135M-Instruct-mlx and ...-mlx-f32).
# ~40 min on 2 cores, mostly the llama.cpp build; each part is skipped when already there.
#   bash bench/serve_load_setup.sh [llama] [vllm-mlx] [guidellm]     (default: llama vllm-mlx)
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${*:-llama vllm-mlx}
LLAMA_VERSION=${LLAMA_VERSION:-0.3.36}  # the newest llama-cpp-python 0.3.x on PyPI at the time of writing

for part in $PARTS; do
  case $part in
    llama)
      if [ ! -x /tmp/llama-build/bin/llama-server ]; then
        mkdir -p /tmp/llama
        .venv/bin/pip download "llama-cpp-python==$LLAMA_VERSION" --no-deps --no-binary :all: -d /tmp/llama
        tar xzf "/tmp/llama/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C /tmp/llama
        # cmake >= 3.14 and a C++17 compiler (Debian: apt-get install cmake ninja-build g++; or
        # pip install cmake ninja into a venv under /tmp)
        cmake -S "/tmp/llama/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp" -B /tmp/llama-build -G Ninja \
          -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON \
          -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
        cmake --build /tmp/llama-build --target llama-server -j2
      fi
      /tmp/llama-build/bin/llama-server --version
      ;;
    vllm-mlx)
      if [ ! -x /tmp/vllm-mlx-venv/bin/vllm-mlx ]; then
        python3 -m venv /tmp/vllm-mlx-venv
        # --no-deps: its hard deps mlx-vlm, mlx-embeddings, torchvision, opencv-python and gradio serve
        # vision / audio / the UI only; mlx-lm pinned as vllm-mlx 0.6.0 asks (<0.32)
        /tmp/vllm-mlx-venv/bin/pip install --no-deps vllm-mlx==0.6.0
        /tmp/vllm-mlx-venv/bin/pip install mlx==0.32.4 mlx-cpu==0.32.4 mlx-lm==0.31.3 "transformers>=5" \
          tokenizers huggingface-hub numpy pillow tqdm pyyaml requests tabulate psutil fastapi \
          "starlette>=1.0.1" uvicorn prometheus-client jsonschema pytz jinja2 protobuf sentencepiece \
          python-multipart
      fi
      /tmp/vllm-mlx-venv/bin/python -c "import importlib.metadata as m; print('vllm-mlx', m.version('vllm-mlx'), 'mlx-lm', m.version('mlx-lm'))"
      ;;
    guidellm)
      if [ ! -x /tmp/guidellm-venv/bin/guidellm ]; then
        python3 -m venv /tmp/guidellm-venv
        /tmp/guidellm-venv/bin/pip install guidellm==0.8.1  # pulls in torch: ~6 GB
      fi
      /tmp/guidellm-venv/bin/guidellm --version
      ;;
    *) echo "unknown part: $part (llama, vllm-mlx, guidellm)" >&2; exit 2 ;;
  esac
done
