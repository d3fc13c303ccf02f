"""Attention over a quantized KV cache: every backend path against a float64 definition on many
shapes (head dims, GQA ratios, lengths off the block size, 4/8 bits, groups 32/64, windows), the
cache's switch to quantized after ``quantized_kv_start``, and the working memory staying bounded."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlxllm.model.cache import KVCache, QuantizedKVCache
from mlxllm.kernels import quantized_sdpa, reference


def definition(q, keys, values, scale, causal, window, group_size, bits) -> tuple[np.ndarray, np.ndarray]:
    """softmax(q K^T scale + mask) V in float64 over the dequantized cache, head by head, and each row's
    log-sum-exp of scores (-inf, with output 0, for a row that sees no key)."""
    k = np.array(mx.dequantize(*keys, group_size=group_size, bits=bits).astype(mx.float32), dtype=np.float64)
    v = np.array(mx.dequantize(*values, group_size=group_size, bits=bits).astype(mx.float32), dtype=np.float64)
    q = np.array(q.astype(mx.float32), dtype=np.float64)
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out, lse = np.zeros((B, Hq, L, v.shape[-1])), np.full((B, Hq, L), -np.inf)
    qpos, kpos = np.arange(S - L, S)[:, None], np.arange(S)[None]
    visible = np.ones((L, S), bool)
    if causal:
        visible &= kpos <= qpos
    if window is not None:
        visible &= qpos - kpos < window
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            s = q[b, h] @ k[b, kh].T * scale
            seen = visible.any(-1)
            s = np.where(visible, s, -np.inf)[seen]
            m = s.max(-1, keepdims=True)
            p = np.exp(s - m)
            out[b, h, seen] = (p / p.sum(-1, keepdims=True)) @ v[b, kh]
            lse[b, h, seen] = (m + np.log(p.sum(-1, keepdims=True)))[:, 0]
    return out, lse


def assert_attention(got, want, atol=2e-5, rtol=1e-4):
    """Outputs and log-sum-exps agree; a row that sees nothing has output 0 and an lse below -1e29."""
    (out, lse), (want_out, want_lse) = (np.array(x.astype(mx.float32) if isinstance(x, mx.array) else x, np.float64)
                                        for x in got), want
    np.testing.assert_allclose(out, want_out, atol=atol, rtol=rtol)
    none = np.isinf(want_lse)
    assert (lse[none] < -1e29).all()
    np.testing.assert_allclose(lse[~none], want_lse[~none], atol=atol, rtol=rtol)


def packed(B, H, S, D, group_size, bits, seed):
    x = mx.random.normal((B, H, S, D), key=mx.random.key(seed))
    return mx.quantize(x, group_size, bits)


CASES = [  # (head dim, q heads, kv heads, queries, keys, bits, group, causal, window)
    (64, 4, 4, 1, 37, 8, 64, False, None),
    (128, 8, 2, 1, 300, 4, 32, False, None),
    (64, 8, 1, 8, 300, 4, 64, True, None),  # 8 speculative queries, GQA 8
    (96, 8, 2, 33, 600, 8, 32, True, None),
    (256, 4, 1, 3, 129, 4, 64, True, None),
    (64, 4, 1, 40, 700, 8, 32, True, 100),  # sliding window, some blocks skipped entirely
    (128, 4, 4, 1, 513, 4, 64, False, 64),
    (64, 4, 2, 20, 12, 8, 64, True, None),  # more queries than keys: the first 8 see none
]


@pytest.mark.parametrize("D, Hq, Hkv, L, S, bits, group, causal, window", CASES)
@pytest.mark.parametrize("block", [None, 256])
def test_reference_path_equals_definition(D, Hq, Hkv, L, S, bits, group, causal, window, block):
    q = mx.random.normal((1, Hq, L, D), key=mx.random.key(1))
    keys, values = packed(1, Hkv, S, D, group, bits, 2), packed(1, Hkv, S, D, group, bits, 3)
    scale = D**-0.5
    got = reference.quantized_sdpa(q, keys, values, scale, causal, window, group, bits, block=block)
    assert_attention(got, definition(q, keys, values, scale, causal, window, group, bits))


def test_small_blocks_and_batches():
    """Many blocks, including a last short one, and a batch of two."""
    q = mx.random.normal((2, 4, 7, 64), key=mx.random.key(4))
    keys, values = packed(2, 2, 1000, 64, 64, 8, 5), packed(2, 2, 1000, 64, 64, 8, 6)
    got = reference.quantized_sdpa(q, keys, values, 0.125, True, None, 64, 8, block=64)
    assert_attention(got, definition(q, keys, values, 0.125, True, None, 64, 8))


def test_half_precision_cache():
    """bf16 queries with bf16 scales (the default activation dtype on a GPU) stay close to the definition."""
    q = mx.random.normal((1, 4, 4, 64), key=mx.random.key(7)).astype(mx.bfloat16)
    x = mx.random.normal((1, 2, 300, 64), key=mx.random.key(8)).astype(mx.bfloat16)
    keys = values = mx.quantize(x, 64, 8)
    got = reference.quantized_sdpa(q, keys, values, 0.125, True, None, 64, 8, block=128)
    assert got[0].dtype == mx.bfloat16
    assert_attention(got, definition(q, keys, values, 0.125, True, None, 64, 8), atol=3e-2)


def test_score_block_is_bounded():
    """Prefill chunks over a long cache get blocks within the score budget; a decode step one block."""
    assert reference.block_size(1, 8, 512, 32768) * 8 * 512 * 4 <= reference.SCORE_BUDGET_BYTES
    assert reference.block_size(1, 32, 4096, 32768) == reference.MIN_BLOCK  # never below the floor
    assert reference.block_size(1, 32, 1, 32768) == 32768


def test_peak_memory_below_full_score_matrix():
    """A 512-query chunk over 16K quantized keys: the full score matrix alone would be 256 MB."""
    H, L, S, D = 8, 512, 16384, 64
    q = mx.random.normal((1, H, L, D))
    keys, values = packed(1, H, S, D, 64, 4, 9), packed(1, H, S, D, 64, 4, 10)
    mx.eval(q, keys, values)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(quantized_sdpa(q, keys, values, 0.125, "causal", 64, 4))
    assert mx.get_peak_memory() - base < H * L * S * 4 / 2


@pytest.mark.parametrize("float_prefix", [0, 16])
def test_cache_attend_equals_float_attention(float_prefix):
    """Through the cache (centre, Hadamard rotation, padding of head dim 80 to whole groups of 32, the
    float prefix merged in): the 8-bit cache's attention is the float attention up to 8-bit rounding,
    and the padding never shows."""
    for D in (64, 80, 96):
        c = QuantizedKVCache(8, 32, float_prefix=float_prefix)
        k = mx.random.normal((1, 2, 50, D), key=mx.random.key(11)) + 3.0  # an offset the centre removes
        v = mx.random.normal((1, 2, 50, D), key=mx.random.key(13))
        packed_k, packed_v = c.update_and_fetch(k, v)
        q = mx.random.normal((1, 4, 3, D), key=mx.random.key(12))
        got = c.attend(q, packed_k, packed_v, D**-0.5, "causal")
        want = mx.fast.scaled_dot_product_attention(q, mx.repeat(k, 2, axis=1), mx.repeat(v, 2, axis=1),
                                                    scale=D**-0.5, mask="causal")
        assert got.shape == (1, 4, 3, D)
        assert mx.abs(got - want).max().item() < 0.02, D


def test_stored_form_is_exact_before_rounding():
    """Centring and rotating change no score and no output: checked without quantization error."""
    c = QuantizedKVCache(8, 64)
    k, v = mx.random.normal((1, 1, 20, 64)) + 1.5, mx.random.normal((1, 1, 20, 64))
    ks, vs = c._stored_form(k, v)
    q = mx.random.normal((1, 1, 4, 64))
    qs = q @ c.rotation
    s, s_stored = q @ k.swapaxes(-1, -2), qs @ ks.swapaxes(-1, -2)
    assert mx.allclose(mx.softmax(s, -1), mx.softmax(s_stored, -1), atol=1e-5).item()
    assert mx.allclose(mx.softmax(s, -1) @ v, (mx.softmax(s_stored, -1) @ vs) @ c.rotation.T, atol=1e-5).item()


def test_cache_switches_to_quantized_after_start():
    """The first ``start`` positions are held in float; the chunk crossing ``start`` packs all but the
    float prefix, which keeps the first positions exactly."""
    c, ref = QuantizedKVCache(8, 32, start=10, float_prefix=4), KVCache()
    chunks = [mx.random.normal((1, 2, n, 64), key=mx.random.key(n)) for n in (4, 5, 6, 1)]
    for i, x in enumerate(chunks):
        k, v = c.update_and_fetch(x, -x)
        rk, _ = ref.update_and_fetch(x, -x)
        if i < 2:  # 9 positions so far: still float
            assert not c.quantized and mx.array_equal(k, rk).item()
        else:
            assert c.quantized and isinstance(k, tuple) and k[0].shape[2] == rk.shape[2] - 4 and c.offset == rk.shape[2]
            assert mx.array_equal(c.prefix[0], rk[:, :, :4]).item()
            deq = mx.dequantize(*k, group_size=32, bits=8) @ c.rotation.T + c.center  # undo the stored form
            assert mx.allclose(deq, rk[:, :, 4:], atol=0.05).item()
    assert c.nbytes < ref.nbytes / 2


def _float_reference(q, k, v, scale):
    rep = q.shape[1] // k.shape[1]
    return mx.fast.scaled_dot_product_attention(q, mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1), scale=scale,
                                                mask="causal" if q.shape[2] > 1 else None)


@pytest.mark.parametrize("bits", [8, 4])
def test_float_prefix_attention_through_the_decoder_path(bits):
    """Chunks that end inside the prefix, one that crosses it, decode steps and a trim back into the
    prefix: each step's attention equals float attention over everything so far (exactly while all of it
    is in the prefix), and the first keys, made outliers here, are never rounded."""
    D, scale = 64, 0.125
    c = QuantizedKVCache(bits, 32, float_prefix=6)
    k_all = mx.random.normal((1, 2, 40, D), key=mx.random.key(21))
    k_all[:, :, 0] = k_all[:, :, 0] * 20  # an attention sink: outlier key
    v_all = mx.random.normal((1, 2, 40, D), key=mx.random.key(22))
    q_all = mx.random.normal((1, 4, 40, D), key=mx.random.key(23))
    errors = []

    def step(lo, hi):
        k, v = c.update_and_fetch(k_all[:, :, lo:hi], v_all[:, :, lo:hi])
        q = q_all[:, :, lo:hi]
        mask = c.mask(hi - lo)
        if isinstance(k, tuple):
            got = c.attend(q, k, v, scale, mask)
        else:
            assert hi <= 6 and k.shape[2] == hi  # still all float: the plain path
            got = mx.fast.scaled_dot_product_attention(q, mx.repeat(k, 2, axis=1), mx.repeat(v, 2, axis=1), scale=scale,
                                                       mask=mask)
        want = _float_reference(q_all[:, :, :hi], k_all[:, :, :hi], v_all[:, :, :hi], scale)[:, :, lo:hi]
        errors.append(mx.abs(got - want).max().item())

    for lo, hi in [(0, 3), (3, 5), (5, 20), (20, 21), (21, 29)]:
        step(lo, hi)
    assert errors[0] < 1e-6 and errors[1] < 1e-6
    assert max(errors) < (0.03 if bits == 8 else 0.3)
    assert mx.array_equal(c.prefix[0], k_all[:, :, :6]).item()
    assert c.trim(25) and c.offset == 4 and c.n_prefix == 4  # back into the prefix
    errors.clear()
    for lo, hi in [(4, 5), (5, 12), (12, 13)]:
        step(lo, hi)
    assert errors[0] < 1e-6 and max(errors) < (0.03 if bits == 8 else 0.3)
    assert c.n_prefix == 6 and c.offset == 13 and c.nbytes > 0
