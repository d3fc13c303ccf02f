"""The KV cache of chunked-attention layers (Llama 4): a query sees only the keys of its own chunk of
``chunk`` positions (``[p // chunk * chunk, p]``). Every key stays held, as in a global layer; the mask
hides the other chunks, so within the first chunk it is the plain causal cache (the batched form is
``batch.BatchChunkedCache``)."""

from __future__ import annotations

from .kv import KVCache, Mask, causal_mask


class ChunkedKVCache(KVCache):
    def __init__(self, chunk: int) -> None:
        super().__init__()
        self.chunk = chunk

    def mask(self, n_queries: int) -> Mask:
        if self.offset + n_queries <= self.chunk:
            return super().mask(n_queries)
        return causal_mask(self.offset, n_queries, 0, self.offset + n_queries, None, self.chunk)

    def copy(self) -> "ChunkedKVCache":
        new = ChunkedKVCache(self.chunk)
        held = super().copy()
        new.keys, new.values, new.offset = held.keys, held.values, held.offset
        return new
