"""The growing float KV cache of global attention layers, and the causal mask every cache shares.

Caches keep keys/values as ``[B, kv_heads, S, head_dim]`` and hand attention exactly the keys it may
see plus the mask that goes with them, so the decoder never reasons about positions itself.
"""

from __future__ import annotations

import mlx.core as mx

Mask = mx.array | str | None


def causal_mask(q_start: int, n_queries: int, k_start: int, n_keys: int, window: int | None,
                chunk: int | None = None) -> mx.array:
    """Boolean ``[L, S]`` mask for queries at absolute positions q_start.. over keys at k_start..;
    a key is visible when it is not in the future, (with a window) fewer than ``window`` back and (with
    a chunk size) in the query's chunk."""
    q = mx.arange(q_start, q_start + n_queries)[:, None]
    k = mx.arange(k_start, k_start + n_keys)[None]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    if chunk is not None:
        mask = mask & (k // chunk == q // chunk)
    return mask


class KVCache:
    """Grows in blocks of ``step`` positions so a decode step writes in place instead of reallocating."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        end = self.offset + n
        if self.keys is None or end > self.keys.shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            B, H, _, Dk = keys.shape
            new_k = mx.zeros((B, H, grow, Dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def mask(self, n_queries: int) -> Mask:
        """Mask for the next ``n_queries`` tokens (call before ``update_and_fetch``)."""
        if n_queries == 1:
            return None
        return "causal"

    def trim(self, n: int) -> bool:
        """Forget the last ``n`` positions (their slots are overwritten by the next update)."""
        self.offset -= min(n, self.offset)
        return True

    def copy(self) -> "KVCache":
        """An independent cache of the same positions, holding only what is used (for the prefix cache)."""
        new = type(self)()
        if self.keys is not None and self.offset:
            new.keys, new.values = (mx.contiguous(x[..., : self.offset, :]) for x in (self.keys, self.values))
        new.offset = self.offset
        return new

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else (self.keys.nbytes + self.values.nbytes) * self.offset // self.keys.shape[2]

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]
