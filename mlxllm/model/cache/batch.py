"""Batched caches: one layer's cache for several sequences decoding together.

A sequence is prefilled alone into the ordinary per-sequence caches (``kv``, ``rotating``,
``quantized``); when its prompt is in, its caches join a batch (``extend``) and from then on every
decode step runs all rows at once, so the weights are read once per step for all of them. A row
that finishes leaves at once (``filter``), and ``row`` hands any row back as a per-sequence cache
(for the prefix cache). Each row keeps its own true positions: ``offset`` is a per-row array, which
RoPE takes as it is, and the mask each kind builds hides what a row does not hold, so a row's
attention sees exactly the keys it would see alone.

Only decode steps run batched (one token per row; the float cache also takes ``k + 1`` per row to
verify drafted tokens, and rolls rows back one by one); chunks of a prompt go through the
per-sequence caches. ``batch_cache`` picks the batched form of a per-sequence cache.
"""

from __future__ import annotations

import mlx.core as mx

from .chunked import ChunkedKVCache
from .kv import KVCache, Mask
from .quantized import QuantizedKVCache
from .recurrent import BatchRecurrentCache, RecurrentCache
from .rotating import RotatingKVCache


def _round_up(n: int, step: int) -> int:
    return max(step, (n + step - 1) // step * step)


def _write_rows(buffer: mx.array, columns: mx.array, new: mx.array) -> mx.array:
    """``buffer [B, H, S, D]`` with row b's columns ``columns[b] + j`` set to ``new[b, :, j]`` (in place)."""
    B, H, T, D = new.shape
    at = columns[:, None] + mx.arange(T)[None] if T > 1 else columns[:, None]
    return mx.put_along_axis(buffer, mx.broadcast_to(at[:, None, :, None], (B, H, T, D)), new, axis=2)


class _PaddedRows:
    """Rows of keys and values ``[B, H, capacity, D]`` side by side, each with its own length; the
    shared storage of the float and ring batches."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.lengths: list[int] = []  # positions each row has seen
        self._offset: mx.array | None = None

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def offset(self) -> mx.array:
        """Per-row positions of the next token (RoPE's offsets)."""
        if self._offset is None:
            self._offset = mx.array(self.lengths, dtype=mx.int32)
        return self._offset

    def _set_lengths(self, lengths: list[int]) -> None:
        self.lengths, self._offset = lengths, None

    def _fit(self, capacity: int) -> None:
        """Widen the storage to at least ``capacity`` columns (a copy, in blocks of ``step``)."""
        held = self.keys.shape[2]
        if capacity <= held:
            return
        grow = _round_up(capacity - held, self.step)
        self.keys, self.values = (mx.pad(x, [(0, 0), (0, 0), (0, grow), (0, 0)]) for x in (self.keys, self.values))

    def _append(self, keys: list[mx.array], values: list[mx.array], lengths: list[int], capacity: int) -> None:
        """Add rows given as ``[1, H, n, D]`` arrays (n <= capacity), padded to the storage width."""
        if self.keys is not None:
            capacity = max(capacity, self.keys.shape[2])
            self._fit(capacity)
        width = self.keys.shape[2] if self.keys is not None else capacity

        def padded(x: mx.array) -> mx.array:
            return mx.pad(x, [(0, 0), (0, 0), (0, width - x.shape[2]), (0, 0)])

        held_k = [self.keys] if self.keys is not None else []
        held_v = [self.values] if self.values is not None else []
        self.keys = mx.concatenate(held_k + [padded(k) for k in keys], axis=0)
        self.values = mx.concatenate(held_v + [padded(v) for v in values], axis=0)
        self._set_lengths(self.lengths + lengths)

    def _keep(self, rows: list[int], width: int) -> None:
        """Keep only ``rows`` (in that order) and ``width`` columns: new, compact arrays, so the memory
        of the rows that left is released as soon as they are evaluated."""
        if not rows:
            self.keys = self.values = None
            self._set_lengths([])
            return
        index = mx.array(rows, dtype=mx.int32)
        self.keys, self.values = (mx.take(x[..., :width, :], index, axis=0) for x in (self.keys, self.values))
        self._set_lengths([self.lengths[r] for r in rows])

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class BatchKVCache(_PaddedRows):
    """The batched growing float cache (and latent-attention cache): row b holds positions
    ``[0, lengths[b])`` from column 0; a step writes each row's new position at its own length."""

    def extend(self, caches: list[KVCache]) -> None:
        """Add the rows of these per-sequence caches."""
        keys = [c.keys[..., : c.offset, :] for c in caches]
        values = [c.values[..., : c.offset, :] for c in caches]
        lengths = [c.offset for c in caches]
        self._append(keys, values, lengths, _round_up(max(lengths) + 1, self.step))

    def filter(self, rows: list[int]) -> None:
        width = _round_up(max((self.lengths[r] for r in rows), default=0) + 1, self.step)
        self._keep(rows, width)

    def row(self, i: int) -> KVCache:
        cache = KVCache()
        n = self.lengths[i]
        cache.keys, cache.values = (mx.contiguous(x[i : i + 1, :, :n, :]) for x in (self.keys, self.values))
        cache.offset = n
        return cache

    def mask(self, n_queries: int) -> Mask:
        """The keys row b's query j may see after this step: its first ``lengths[b] + j + 1`` (call
        before the update). Every row takes ``n_queries`` tokens: one when decoding, ``k + 1`` when a
        batch verifies drafted tokens."""
        if n_queries == 1 and len(set(self.lengths)) == 1:
            return None
        keys = mx.arange(max(self.lengths) + n_queries)[None, None]
        return (keys <= self.offset[:, None, None] + mx.arange(n_queries)[None, :, None])[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        end = max(self.lengths) + n
        self._fit(end)
        self.keys = _write_rows(self.keys, self.offset, keys)
        self.values = _write_rows(self.values, self.offset, values)
        self._set_lengths([length + n for length in self.lengths])
        return self.keys[..., :end, :], self.values[..., :end, :]

    def trim_rows(self, counts: list[int]) -> None:
        """Forget the last ``counts[b]`` positions of each row b (drafted tokens that were rejected)."""
        self._set_lengths([length - c for length, c in zip(self.lengths, counts)])


class BatchRingCache(_PaddedRows):
    """The batched sliding-window ring: position p of a row lives in column ``p % window``, so a
    step writes each row's new position over its oldest, and attention over a full ring needs no
    order (RoPE has already encoded the positions)."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def _width(self, longest: int) -> int:
        return min(self.window, _round_up(longest, self.step))

    def extend(self, caches: list[RotatingKVCache]) -> None:
        keys, values = [], []
        for c in caches:
            held = c.copy()  # time order: the last min(offset, window) positions
            shift = c.offset % self.window if c.offset >= self.window else 0
            keys.append(mx.roll(held.keys, shift, axis=2) if shift else held.keys)
            values.append(mx.roll(held.values, shift, axis=2) if shift else held.values)
        lengths = [c.offset for c in caches]
        self._append(keys, values, lengths, self._width(max(lengths) + 1))

    def filter(self, rows: list[int]) -> None:
        self._keep(rows, self._width(max((self.lengths[r] for r in rows), default=0) + 1))

    def row(self, i: int) -> RotatingKVCache:
        cache = RotatingKVCache(self.window)
        n = self.lengths[i]
        k, v = self.keys[i : i + 1], self.values[i : i + 1]
        if n >= self.window:  # back to time order
            k, v = (mx.roll(x[..., : self.window, :], -(n % self.window), axis=2) for x in (k, v))
        else:
            k, v = k[..., :n, :], v[..., :n, :]
        cache.keys, cache.values, cache.offset = mx.contiguous(k), mx.contiguous(v), n
        return cache

    def mask(self, n_queries: int) -> Mask:
        """Columns row b holds after this step: all of the ring once it is full, else its first
        ``lengths[b] + 1`` (each a position within the window of the new token)."""
        _single_token(n_queries)
        width = self._width(max(self.lengths) + 1)
        held = [min(n + 1, self.window) for n in self.lengths]
        if all(h == width for h in held):
            return None
        return (mx.arange(width)[None] < mx.array(held)[:, None])[:, None, None, :]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        _single_token(keys.shape[2])
        width = self._width(max(self.lengths) + 1)
        self._fit(width)
        columns = self.offset % self.window
        self.keys = _write_rows(self.keys, columns, keys)
        self.values = _write_rows(self.values, columns, values)
        self._set_lengths([n + 1 for n in self.lengths])
        return self.keys[..., :width, :], self.values[..., :width, :]


class BatchRowsCache:
    """Rows kept as their own per-sequence caches, attention run row by row: the batched form of the
    quantized cache, whose fused kernels read each row's packed keys in place (the linear layers,
    where a decode step's weight reads go, still run once for all rows)."""

    def __init__(self) -> None:
        self.rows: list[QuantizedKVCache] = []

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def offset(self) -> mx.array:
        return mx.array([c.offset for c in self.rows], dtype=mx.int32)

    def extend(self, caches: list[QuantizedKVCache]) -> None:
        self.rows = self.rows + list(caches)

    def filter(self, rows: list[int]) -> None:
        self.rows = [self.rows[r] for r in rows]

    def row(self, i: int) -> QuantizedKVCache:
        return self.rows[i].copy()

    def mask(self, n_queries: int) -> Mask:
        _single_token(n_queries)
        return None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[tuple, tuple]:
        """Each row's own update; the tuple result sends the decoder to ``attend``."""
        fetched = [c.update_and_fetch(keys[b : b + 1], values[b : b + 1]) for b, c in enumerate(self.rows)]
        return tuple(k for k, _ in fetched), tuple(v for _, v in fetched)

    def attend(self, q: mx.array, keys: tuple, values: tuple, scale: float, mask: Mask) -> mx.array:
        out = []
        for b, (c, k, v) in enumerate(zip(self.rows, keys, values)):
            qb = q[b : b + 1]
            if isinstance(k, tuple):  # packed
                out.append(c.attend(qb, k, v, scale, None))
            else:  # still within the float prefix
                out.append(mx.fast.scaled_dot_product_attention(qb, k, v, scale=scale, mask=None))
        return mx.concatenate(out, axis=0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.rows)

    @property
    def state(self) -> list[mx.array]:
        return [a for c in self.rows for a in c.state]


class BatchChunkedCache(BatchKVCache):
    """The batched chunked cache: rows as in ``BatchKVCache``, each masked to its own chunk."""

    def __init__(self, chunk: int) -> None:
        super().__init__()
        self.chunk = chunk

    def row(self, i: int) -> ChunkedKVCache:
        cache = ChunkedKVCache(self.chunk)
        held = super().row(i)
        cache.keys, cache.values, cache.offset = held.keys, held.values, held.offset
        return cache

    def mask(self, n_queries: int) -> Mask:
        if max(self.lengths) + n_queries <= self.chunk:
            return super().mask(n_queries)
        keys = mx.arange(max(self.lengths) + n_queries)[None, None]
        queries = self.offset[:, None, None] + mx.arange(n_queries)[None, :, None]
        return ((keys <= queries) & (keys // self.chunk == queries // self.chunk))[:, None]


BatchCache = BatchKVCache | BatchRingCache | BatchRowsCache | BatchRecurrentCache


class FusedStep:
    """One layer's caches for a step that runs the batch's decode tokens and one sequence's prompt
    chunk through the model together, laid out as one row ``[1, rows + chunk]``: the linear layers
    read their weights once for both, and attention is split, each part over its own cache."""

    def __init__(self, batch: BatchCache, chunk: KVCache | RotatingKVCache | RecurrentCache, rows: int) -> None:
        self.batch, self.chunk, self.rows = batch, chunk, rows

    def mask(self, n_queries: int) -> Mask:
        return None  # each part makes its own in ``split``

    def split(self, tensors: tuple[mx.array, ...], attend) -> mx.array:
        """``attend(*parts, mask, cache)`` on the decode part of ``tensors`` (each ``[1, heads, rows +
        chunk, dims]``, moved to ``[rows, heads, 1, dims]``; None stays None) and on the chunk part; outputs
        rejoined."""
        n = self.rows
        decode = [None if t is None else t[:, :, :n].transpose(2, 1, 0, 3) for t in tensors]
        chunk = [None if t is None else t[:, :, n:] for t in tensors]
        out_decode = attend(*decode, self.batch.mask(1), self.batch)
        out_chunk = attend(*chunk, self.chunk.mask(chunk[0].shape[2]), self.chunk)
        return mx.concatenate([out_decode.transpose(2, 1, 0, 3), out_chunk], axis=2)


def batch_cache(cache: KVCache | RotatingKVCache | RecurrentCache) -> BatchCache:
    """An empty batched cache for rows shaped like ``cache``."""
    if isinstance(cache, RecurrentCache):
        return BatchRecurrentCache()
    if isinstance(cache, QuantizedKVCache):
        return BatchRowsCache()
    if isinstance(cache, ChunkedKVCache):
        return BatchChunkedCache(cache.chunk)
    if isinstance(cache, RotatingKVCache):
        return BatchRingCache(cache.window)
    return BatchKVCache()


def _single_token(n: int) -> None:
    if n != 1:
        raise ValueError(f"batched caches take one token per row per step, not {n}")
