"""mlxllm: an Apple-Silicon-native LLM runtime on MLX.

The Python API mirrors mlx-lm's names: ``load``, ``generate``, ``stream_generate``. None of these
names is also a module of the package, so importing any submodule never replaces them.
"""

from typing import Any

from . import backend  # noqa: F401  (first: preloads an optimized BLAS before mlx.core is imported)
from .engine.grammar import Grammar  # noqa: E402
from .engine.sample import make_logits_processors, make_sampler  # noqa: E402
from .engine.stream import GenerationResponse, generate, stream_generate  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "make_sampler", "make_logits_processors", "Grammar"]


def __getattr__(name: str) -> Any:
    # The loader pulls in gguf and huggingface_hub; import it on first use to keep start-up short.
    if name == "load":
        from .formats.loader import load

        return load
    raise AttributeError(f"module 'mlxllm' has no attribute {name!r}")
