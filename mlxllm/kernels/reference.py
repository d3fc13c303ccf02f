"""Attention over a quantized KV cache in plain MLX ops, blockwise with an online softmax.

The same algorithm as the Metal kernels (``metal_kernels/``): keys are visited in blocks; each block's
scores come from the packed keys (a quantized matmul, or on the CPU backend the block alone
dequantized; never a dequantized copy of the cache), the running maximum, normaliser and output are
rescaled as the maximum grows, and the value mix reads the packed values the same way. Working
memory is ``[B, Hq, L, block]`` scores instead of ``[B, Hq, L, S]``, so the memory a quantized cache
saves is not spent again on the score matrix. Blocks no query may see (in the future, or behind a
sliding window) are skipped.
"""

from __future__ import annotations

import mlx.core as mx

from .. import backend

# Score working-set budget per block: a decode step (L = 1) then takes the whole cache in one block.
# Lazy evaluation keeps about six block-sized temporaries alive (scores, mask, exponentials...).
SCORE_BUDGET_BYTES = 8 * 2**20
MIN_BLOCK = 256
CPU_PACKED_ROWS = 8  # up to this many query rows per K/V head, the CPU reads the packed cache directly
_MASKED = -1e30  # finite, so a row with nothing visible yet gives exp(0) terms that a later real maximum wipes out


def block_size(batch: int, heads: int, n_queries: int, n_keys: int) -> int:
    """Keys per block: as many as fit the score budget, a multiple of ``MIN_BLOCK``, at most all."""
    fit = SCORE_BUDGET_BYTES // (4 * batch * heads * n_queries)
    return min(n_keys, max(MIN_BLOCK, fit // MIN_BLOCK * MIN_BLOCK))


def quantized_sdpa(q: mx.array, keys: tuple, values: tuple, scale: float, causal: bool, window: int | None,
                   group_size: int, bits: int, block: int | None = None) -> mx.array:
    """``softmax(q K^T * scale + mask) V`` for ``q [B, Hq, L, D]`` over packed K/V ``[B, Hkv, S, ...]``
    (MLX affine triples). GQA: each K/V head serves ``Hq / Hkv`` query heads and is read once for them.
    ``causal``: the L queries are the last L of the S positions (L > S: the first L - S queries come
    before every key); ``window``: a key is visible only when fewer than ``window`` positions back.
    Accumulates in float32. Returns the output in ``q``'s dtype and each row's float32 log-sum-exp of
    scores ``[B, Hq, L]``, which lets a caller merge attention over other keys; a row that sees no key
    gets output 0 and an lse of about -1e30."""
    B, Hq, L, D = q.shape
    Hkv, S = keys[0].shape[1], keys[0].shape[2]
    rep = Hq // Hkv
    block = block or block_size(B, Hq, L, S)
    # On the CPU backend a block of a prefill chunk is dequantized and multiplied in float32 (BLAS;
    # MLX's CPU quantized matmul is slower for many query rows); a decode step's few rows (query
    # heads x queries <= 8) read the packed block directly, as every other backend does, which on
    # the CPU beats unpacking the whole cache (README, "Quantized KV cache").
    unpack = backend.device_name() == "cpu" and rep * L > CPU_PACKED_ROWS
    dtype = mx.float32 if unpack else keys[1].dtype
    qs = (q.astype(mx.float32) * scale).astype(dtype).reshape(B, Hkv, rep * L, D)  # query heads folded into rows
    q_pos = mx.arange(S - L, S)[:, None]
    first_q, last_q = S - L, S - 1
    m = l = acc = None
    for start in range(0, S, block):
        end = min(start + block, S)
        if causal and start > last_q:
            break
        if window is not None and end - 1 <= first_q - window:
            continue  # every key here is behind every query's window
        if acc is not None:  # order the blocks: without it lazy evaluation may hold every block's scores at once
            qs = mx.depends(qs, [acc, l])
        k_blk, v_blk = (tuple(a[:, :, start:end] for a in t) for t in (keys, values))
        if unpack:
            k_blk, v_blk = (mx.dequantize(*t, group_size=group_size, bits=bits).astype(mx.float32) for t in (k_blk, v_blk))
            s = qs @ k_blk.swapaxes(-1, -2)
        else:
            s = mx.quantized_matmul(qs, *k_blk, transpose=True, group_size=group_size, bits=bits)
        s = s.astype(mx.float32).reshape(B, Hkv, rep, L, end - start)
        visible = None
        if causal and end - 1 > first_q:
            visible = mx.arange(start, end)[None] <= q_pos
        if window is not None and start <= last_q - window:
            near = q_pos - mx.arange(start, end)[None] < window
            visible = near if visible is None else visible & near
        if visible is not None:
            s = mx.where(visible, s, _MASKED)
        blk_max = s.max(axis=-1, keepdims=True)
        m_new = blk_max if m is None else mx.maximum(m, blk_max)
        p = mx.exp(s - m_new)
        p_rows = p.astype(dtype).reshape(B, Hkv, rep * L, end - start)
        if unpack:
            pv = p_rows @ v_blk
        else:
            pv = mx.quantized_matmul(p_rows, *v_blk, transpose=False, group_size=group_size, bits=bits)
        pv = pv.astype(mx.float32).reshape(B, Hkv, rep, L, -1)
        if m is None:
            l, acc = p.sum(axis=-1, keepdims=True), pv
        else:
            corr = mx.exp(m - m_new)
            l = l * corr + p.sum(axis=-1, keepdims=True)
            acc = acc * corr + pv
        m = m_new
    seen = m > _MASKED / 2
    out = mx.where(seen, acc / l, 0.0).astype(q.dtype).reshape(B, Hq, L, -1)
    return out, (m + mx.log(l)).reshape(B, Hq, L)
