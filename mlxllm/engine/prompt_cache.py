"""A KV cache kept across calls, so each chat turn recomputes only what it does not share."""

from __future__ import annotations

from typing import Any

from ..model.cache import KVSettings

class PromptCache:
    """A KV cache kept across calls (chat turns): each new prompt recomputes only what differs from
    the tokens already cached, after trimming the cache back to the common prefix."""

    def __init__(self, model: Any, kv: KVSettings | None = None) -> None:
        self.model, self.kv = model, kv.checked(model.config) if kv is not None else None
        self.cache = model.make_cache(kv)
        self.tokens: list[int] = []  # the tokens whose K/V the cache holds, in order

    def suffix(self, ids: list[int]) -> list[int]:
        """Trim the cache to its longest common prefix with ``ids``; return the ids still to feed."""
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)  # at least one token must go through the model to get logits
        if not all(c.trim(len(self.tokens) - n) for c in self.cache):
            self.cache, n = self.model.make_cache(self.kv), 0  # a sliding window wrapped: start over
        self.tokens = self.tokens[:n]
        return ids[n:]

    def record(self, ids: list[int]) -> None:
        """After generating from ``suffix`` output: ``ids`` = prompt + generated tokens seen so far."""
        self.tokens = ids[: self.cache[0].offset]
