"""The engine: sampling, the prefill/decode steps, streaming generation, the prompt cache and
speculative decoding, over any model from ``mlxllm.model``."""
