"""The quantized KV cache: packed keys/values read in place by ``mlxllm.kernels.quantized_sdpa``, a
float prefix for the attention sinks, and the centring + Hadamard rotation that make rounding cheaper."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ...kernels import quantized_sdpa
from .kv import KVCache, Mask, causal_mask
from .settings import FLOAT_PREFIX


def hadamard(n: int) -> mx.array:
    """Orthonormal ``[n, n]``: blocks of the largest power-of-two Hadamard matrix dividing ``n``."""
    size = n & -n
    h = np.ones((1, 1))
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    return mx.array(np.kron(np.eye(n // size), h) / np.sqrt(size), dtype=mx.float32)


def _float_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, visible: mx.array | None
                     ) -> tuple[mx.array, mx.array]:
    """Attention over a few float keys with its log-sum-exp, as ``quantized_sdpa`` returns it, so the
    two can be merged; ``visible`` is an ``[L, P]`` mask or None."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    qs = (q.astype(mx.float32) * scale).reshape(B, Hkv, Hq // Hkv * L, D)
    s = (qs @ k.astype(mx.float32).swapaxes(-1, -2)).reshape(B, Hkv, Hq // Hkv, L, -1)
    if visible is not None:
        s = mx.where(visible, s, -mx.inf)
    m = mx.maximum(s.max(axis=-1, keepdims=True), -1e30)  # finite for a row that sees nothing
    p = mx.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    out = (p.reshape(B, Hkv, -1, k.shape[2]) @ v.astype(mx.float32)).reshape(B, Hkv, Hq // Hkv, L, -1)
    return (out / mx.maximum(l, 1e-30)).reshape(B, Hq, L, -1), (m + mx.log(l)).reshape(B, Hq, L)


def merge_attention(a: tuple[mx.array, mx.array], b: tuple[mx.array, mx.array]) -> mx.array:
    """Attention over the union of two disjoint key sets from each set's (output, log-sum-exp)."""
    m = mx.maximum(a[1], b[1])
    wa, wb = mx.exp(a[1] - m)[..., None], mx.exp(b[1] - m)[..., None]
    return (a[0].astype(mx.float32) * wa + b[0].astype(mx.float32) * wb) / (wa + wb)


class QuantizedKVCache(KVCache):
    """Keys and values stored MLX-quantized (``bits`` per element, groups of ``group_size`` along the
    head dimension), appended in place like ``KVCache``; attention reads them packed
    (``mlxllm.kernels.quantized_sdpa``), so the cache never exists in 16/32-bit form.

    The first ``float_prefix`` positions stay in float for good: most heads park attention on the first
    tokens (attention sinks), whose keys are outliers that rounding would move most. Attention over them
    is computed apart and merged through the log-sum-exp. Until a position past the prefix arrives,
    ``update_and_fetch`` returns the float prefix and attention is the plain float one.

    With ``start`` > 0 the first ``start`` positions are all held in float (mlx-lm's
    ``quantized_kv_start``); the chunk that crosses ``start`` quantizes everything held past the prefix,
    and from then on ``update_and_fetch`` returns packed triples (``quantized``).
    A head size that is not a multiple of ``group_size`` (80 with groups of 32) is zero-padded up to
    one; attention pads the queries alike and drops the padded output features.

    What is stored packed is transformed so that rounding costs less, without changing attention: keys
    minus a per-channel centre ``c`` (the mean of the first quantized chunk; ``q.(k - c)`` differs from
    ``q.k`` by the same amount for every key of a query, which softmax ignores and the merge with the
    prefix adds back), then keys and values times an orthonormal Hadamard matrix ``R`` that spreads
    outlier channels over the group (``(qR).(kR) = q.k`` and ``P (V R) R^T = P V``); what each of
    these buys is measured in the README (bench/kv_quality.py)."""

    def __init__(self, bits: int = 8, group_size: int = 64, start: int = 0, float_prefix: int = FLOAT_PREFIX) -> None:
        super().__init__()
        self.bits, self.group_size, self.start, self.float_prefix = bits, group_size, start, float_prefix
        self.quantized = start == 0
        self.prefix: tuple[mx.array, mx.array] | None = None  # [B, kv_heads, <= float_prefix, D] keys, values
        self.center: mx.array | None = None  # [B, kv_heads, 1, D], fixed at the first quantized chunk
        self.rotation: mx.array | None = None  # [D, D] orthonormal

    @property
    def n_prefix(self) -> int:
        return 0 if self.prefix is None else self.prefix[0].shape[2]

    def _stored_form(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        pad = -keys.shape[-1] % self.group_size
        if pad:
            keys, values = (mx.pad(x, [(0, 0)] * 3 + [(0, pad)]) for x in (keys, values))
        if self.rotation is None:
            self.rotation = hadamard(keys.shape[-1])
            self.center = keys.astype(mx.float32).mean(axis=2, keepdims=True)
        k = ((keys.astype(mx.float32) - self.center) @ self.rotation).astype(keys.dtype)
        return k, (values.astype(mx.float32) @ self.rotation).astype(values.dtype)

    def attend(self, q: mx.array, keys: tuple, values: tuple, scale: float, mask: Mask) -> mx.array:
        """Attention of ``q [B, Hq, L, D]`` over what ``update_and_fetch`` returned once quantized,
        merged with attention over the float prefix."""
        D = q.shape[-1]
        pad = self.rotation.shape[0] - D
        qp = mx.pad(q, [(0, 0)] * 3 + [(0, pad)]) if pad else q
        out, lse = quantized_sdpa((qp.astype(mx.float32) @ self.rotation).astype(q.dtype), keys, values, scale, mask,
                                  self.group_size, self.bits)
        out = (out.astype(mx.float32) @ self.rotation.T)[..., :D]
        if self.prefix is not None:
            rep = q.shape[1] // self.center.shape[1]
            lse = lse + scale * (qp.astype(mx.float32) * mx.repeat(self.center, rep, axis=1)).sum(axis=-1)  # undo the centre
            L, P = q.shape[2], self.n_prefix
            visible = causal_mask(self.offset - L, L, 0, P, None) if mask == "causal" and self.offset - L < P - 1 else None
            out = merge_attention((out, lse), _float_attention(q, *self.prefix, scale, visible))
        return out.astype(q.dtype)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        if not self.quantized:
            if self.offset + keys.shape[2] <= self.start:
                return super().update_and_fetch(keys, values)
            if self.keys is not None:  # crossing ``start``: the held float positions join this chunk
                keys = mx.concatenate([self.keys[..., : self.offset, :], keys], axis=2)
                values = mx.concatenate([self.values[..., : self.offset, :], values], axis=2)
            self.keys = self.values = None
            self.offset, self.quantized = 0, True
        take = min(keys.shape[2], self.float_prefix - self.n_prefix)
        if take > 0:  # positions below ``float_prefix`` (nothing is packed yet)
            head = keys[:, :, :take], values[:, :, :take]
            held = self.prefix
            self.prefix = head if held is None else tuple(mx.concatenate([p, h], axis=2) for p, h in zip(held, head))
            keys, values = keys[:, :, take:], values[:, :, take:]
            self.offset += take
        n = keys.shape[2]
        begin = self.offset - self.n_prefix  # packed positions held
        if n == 0 and begin == 0:
            return self.prefix
        end = begin + n
        new = [mx.quantize(x, self.group_size, self.bits) for x in self._stored_form(keys, values)]
        if self.keys is None or end > self.keys[0].shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step

            def widen(held: tuple | None, like: tuple) -> tuple:
                blank = tuple(mx.zeros((*a.shape[:2], grow, a.shape[3]), a.dtype) for a in like)
                if held is None:
                    return blank
                return tuple(mx.concatenate([h[..., :begin, :], b], axis=2) for h, b in zip(held, blank))

            self.keys, self.values = widen(self.keys, new[0]), widen(self.values, new[1])
        for held, fresh in zip((self.keys, self.values), new):
            for h, f in zip(held, fresh):
                h[..., begin:end, :] = f
        self.offset += n
        return tuple(a[..., :end, :] for a in self.keys), tuple(a[..., :end, :] for a in self.values)

    def trim(self, n: int) -> bool:
        if not self.quantized:
            return super().trim(n)
        n = min(n, self.offset)
        packed = self.offset - self.n_prefix
        if n > packed:  # into the float prefix: what remains of it is refilled before anything is packed again
            keep = self.n_prefix - (n - packed)
            self.prefix = tuple(a[:, :, :keep] for a in self.prefix) if keep else None
        self.offset -= n
        return True

    def copy(self) -> "QuantizedKVCache":
        """An independent cache of the same positions (new arrays: updates write in place)."""
        if not self.quantized:
            new = super().copy()
        else:
            new = QuantizedKVCache(self.bits, self.group_size, self.start, self.float_prefix)
            if self.prefix is not None:
                new.prefix = tuple(a[..., :, :] for a in self.prefix)
            packed = self.offset - self.n_prefix
            if self.keys is not None and packed:
                new.keys, new.values = (tuple(mx.contiguous(a[..., :packed, :]) for a in t) for t in (self.keys, self.values))
            new.offset, new.center, new.rotation = self.offset, self.center, self.rotation
        new.bits, new.group_size, new.start, new.float_prefix = self.bits, self.group_size, self.start, self.float_prefix
        new.quantized = self.quantized
        return new

    @property
    def nbytes(self) -> int:
        if not self.quantized:
            return super().nbytes
        prefix = 0 if self.prefix is None else sum(a.nbytes for a in self.prefix)
        if self.keys is None:
            return prefix
        packed = sum(a.nbytes for a in (*self.keys, *self.values))
        return prefix + packed * (self.offset - self.n_prefix) // self.keys[0].shape[2]

    @property
    def state(self) -> list[mx.array]:
        if not self.quantized:
            return super().state
        return [*(self.prefix or ()), *(self.keys or ()), *(self.values or ())]
