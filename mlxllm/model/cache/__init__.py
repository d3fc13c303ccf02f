"""KV caches, one per layer kind: a growing float cache, a quantized cache, a ring buffer for
sliding-window layers and a chunk-masked cache for chunked attention, plus the settings that choose
between them."""

from .chunked import ChunkedKVCache
from .kv import KVCache, Mask, causal_mask
from .quantized import QuantizedKVCache, hadamard, merge_attention
from .rotating import RotatingKVCache
from .settings import FLOAT_PREFIX, KVSettings
from .size import activation_dtype, kv_bytes

__all__ = ["FLOAT_PREFIX", "ChunkedKVCache", "KVCache", "KVSettings", "Mask", "QuantizedKVCache", "RotatingKVCache", "activation_dtype",
           "causal_mask", "kv_bytes",
           "hadamard", "merge_attention"]
