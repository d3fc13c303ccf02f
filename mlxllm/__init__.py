"""mlxllm: an Apple-Silicon-native LLM runtime on MLX."""

from . import backend  # noqa: F401  (first: preloads an optimized BLAS before mlx.core is imported)
