"""Caches, one per layer kind: a growing float KV cache, a quantized one, a ring buffer for
sliding-window layers, a chunk-masked cache for chunked attention and the recurrent state of
linear-attention layers, the view KV-sharing layers attend through, plus the settings that choose
between the KV kinds."""

from .chunked import ChunkedKVCache
from .kv import KVCache, Mask, causal_mask
from .quantized import QuantizedKVCache, hadamard, merge_attention
from .recurrent import RecurrentCache
from .rotating import RotatingKVCache
from .settings import FLOAT_PREFIX, KVSettings
from .shared import SharedKV, shared_view
from .size import activation_dtype, kv_bytes

__all__ = ["FLOAT_PREFIX", "ChunkedKVCache", "KVCache", "KVSettings", "Mask", "QuantizedKVCache", "RecurrentCache", "RotatingKVCache", "SharedKV", "activation_dtype",
           "causal_mask", "kv_bytes",
           "hadamard", "merge_attention", "shared_view"]
