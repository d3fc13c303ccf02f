"""KV caches, one per layer kind: a growing float cache, a quantized cache, and a ring buffer for
sliding-window layers, plus the settings that choose between them."""

from .kv import KVCache, Mask, causal_mask
from .quantized import QuantizedKVCache, hadamard, merge_attention
from .rotating import RotatingKVCache
from .settings import FLOAT_PREFIX, KVSettings
from .size import activation_dtype, kv_bytes

__all__ = ["FLOAT_PREFIX", "KVCache", "KVSettings", "Mask", "QuantizedKVCache", "RotatingKVCache", "activation_dtype",
           "causal_mask", "kv_bytes",
           "hadamard", "merge_attention"]
