"""What a KV-sharing layer (Gemma 4's last ``num_kv_shared_layers``) attends through.

Such a layer has no keys or values of its own: it attends over those the last earlier layer of its kind
fetched from its cache this step, under the same mask and positions. It holds nothing, so it has no
entry in the model's cache list, and copying, trimming, batching or saving the caches never meets it.
"""

from __future__ import annotations

import mlx.core as mx

from .batch import FusedStep
from .kv import Mask


class SharedKV:
    """The keys, values and mask one attention call of the source layer used (``offset``: its positions
    before the step), handed back unchanged; ``source`` is that call's cache (None without one)."""

    def __init__(self, offset: int | mx.array, keys, values, mask: Mask, source) -> None:
        self.offset, self.keys, self.values, self._mask, self.source = offset, keys, values, mask, source

    def mask(self, n_queries: int) -> Mask:
        return self._mask

    def update_and_fetch(self, keys: None, values: None) -> tuple:
        return self.keys, self.values

    def attend(self, q: mx.array, keys: tuple, values: tuple, scale: float, mask: Mask) -> mx.array:
        """Attention over packed keys, as the source's quantized cache runs it."""
        return self.source.attend(q, keys, values, scale, mask)


def shared_view(source, kept: list[SharedKV]) -> SharedKV | FusedStep:
    """The cache a sharing layer attends through, given the source layer's cache entry and what its
    attention calls kept this step (two for a fused step: the decode rows', then the chunk's)."""
    if isinstance(source, FusedStep):
        return FusedStep(kept[0], kept[1], source.rows)
    return kept[0]
