"""The ring-buffer KV cache of sliding-window attention layers."""

from __future__ import annotations

import mlx.core as mx

from .kv import Mask, causal_mask


class RotatingKVCache:
    """Keeps only the last ``window`` positions; a decode step overwrites the oldest slot in place.

    Attention over a full ring needs no order (RoPE already encodes positions), so single-token steps
    never copy. A multi-token chunk puts the ring back in time order, attends over the last
    ``window - 1`` old positions plus the chunk, and keeps the last ``window`` of them.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self._slot = 0  # next ring slot to overwrite once full

    def _in_time_order(self, x: mx.array) -> mx.array:
        if self.offset <= self.window or self._slot == 0:
            return x
        return mx.concatenate([x[..., self._slot :, :], x[..., : self._slot, :]], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        if n == 1 and self.keys is not None and self.keys.shape[2] == self.window:
            self.keys[..., self._slot : self._slot + 1, :] = keys
            self.values[..., self._slot : self._slot + 1, :] = values
            self._slot = (self._slot + 1) % self.window
            self.offset += 1
            return self.keys, self.values
        if self.keys is None:
            all_k, all_v = keys, values
        else:
            keep = self.window - 1
            old_k = self._in_time_order(self.keys)[..., -keep:, :] if keep else self.keys[..., :0, :]
            old_v = self._in_time_order(self.values)[..., -keep:, :] if keep else self.values[..., :0, :]
            all_k = mx.concatenate([old_k, keys], axis=2)
            all_v = mx.concatenate([old_v, values], axis=2)
        self.keys, self.values = all_k[..., -self.window :, :], all_v[..., -self.window :, :]
        self._slot = 0
        self.offset += n
        return all_k, all_v

    def trim(self, n: int) -> bool:
        """Forget the last ``n`` positions; impossible once the ring has overwritten old ones."""
        if self.offset > self.window:
            return False
        self.offset -= min(n, self.offset)
        if self.keys is not None:
            self.keys, self.values = self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        return True

    def copy(self) -> "RotatingKVCache":
        """An independent cache of the same positions, its ring put back in time order."""
        new = RotatingKVCache(self.window)
        if self.keys is not None:
            new.keys, new.values = (mx.contiguous(self._in_time_order(x)[..., :, :]) for x in (self.keys, self.values))
        new.offset = self.offset
        return new

    def mask(self, n_queries: int) -> Mask:
        if n_queries == 1:
            return None
        held = 0 if self.keys is None else min(self.window - 1, self.keys.shape[2])
        return causal_mask(self.offset, n_queries, self.offset - held, held + n_queries, self.window)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]
