"""The Metal kernels (metal_kernels/) run through the Metal-on-CPU emulator against the float64
definition on many shapes; deliberately broken variants must fail, proving the harness can; and the
emulator's subset checks refuse what it does not implement. On a Mac the same cases also run the
real kernels through ``mx.fast.metal_kernel``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import mlx.core as mx

from metal_emu import EmulationError, MetalKernel, check_subset
from mlxllm.kernels import metal
from test_kernels import definition

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the Metal emulator needs g++")

CASES = [  # (head dim, q heads, kv heads, queries, keys, bits, group, causal, window)
    (64, 4, 4, 1, 37, 8, 64, True, None),  # one split, GQA 1
    (128, 8, 2, 1, 300, 4, 32, True, None),  # GQA 4, keys off the block size
    (64, 8, 1, 8, 200, 4, 64, True, None),  # 8 speculative queries, GQA 8
    (96, 4, 1, 3, 150, 8, 32, True, None),
    (256, 2, 1, 2, 70, 4, 64, True, None),
    (64, 4, 2, 4, 260, 8, 32, True, 50),  # sliding window: whole splits see nothing
    (128, 4, 4, 1, 65, 2, 32, False, None),  # 2-bit, no mask
]


def _inputs(D, Hq, Hkv, L, S, bits, group, dtype=mx.float32):
    q = mx.random.normal((1, Hq, L, D), key=mx.random.key(S)).astype(dtype)
    x_k = mx.random.normal((1, Hkv, S, D), key=mx.random.key(S + 1)).astype(dtype)
    x_v = mx.random.normal((1, Hkv, S, D), key=mx.random.key(S + 2)).astype(dtype)
    return q, mx.quantize(x_k, group, bits), mx.quantize(x_v, group, bits)


@pytest.mark.parametrize("D, Hq, Hkv, L, S, bits, group, causal, window", CASES)
def test_decode_kernel_equals_definition(D, Hq, Hkv, L, S, bits, group, causal, window):
    q, keys, values = _inputs(D, Hq, Hkv, L, S, bits, group)
    got = metal.decode_attention(q, keys, values, D**-0.5, causal, window, group, bits, kernel=MetalKernel, block=64)
    want = definition(q, keys, values, D**-0.5, causal, window, group, bits)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_decode_kernel_half_precision():
    q, keys, values = _inputs(64, 4, 2, 2, 100, 8, 64, mx.float16)
    got = metal.decode_attention(q, keys, values, 0.125, True, None, 64, 8, kernel=MetalKernel, block=32)
    np.testing.assert_allclose(got, definition(q, keys, values, 0.125, True, None, 64, 8), atol=2e-3)


def _broken(name: str, old: str, new: str):
    """A kernel factory that serves ``name`` with one line of its source changed."""
    def factory(**spec):
        if spec["name"] == name:
            assert old in spec["source"]
            spec = {**spec, "name": name + "_broken", "source": spec["source"].replace(old, new)}
        return MetalKernel(**spec)
    return factory


@pytest.mark.parametrize("name, old, new", [
    ("sdpa_combine", "threadgroup_barrier(mem_flags::mem_threadgroup);", ""),  # dropped barrier
    ("sdpa_decode_quantized", "int start = split * BLOCK;", "int start = split * BLOCK + 1;"),  # off by one
    ("sdpa_decode_quantized", "float s = simd_sum(partial);", "float s = partial;"),  # lost reduction
    ("sdpa_decode_quantized", "int qpos = S - NQ + qi % NQ;", "int qpos = S - NQ + qi % NQ - 1;"),  # mask shifted
])
def test_broken_variants_fail(name, old, new):
    q, keys, values = _inputs(64, 4, 2, 2, 100, 8, 64)
    try:
        got = metal.decode_attention(q, keys, values, 0.125, True, None, 64, 8, kernel=_broken(name, old, new), block=32)
    except EmulationError as e:  # the harness itself caught it (a race between thread orders)
        assert "order threads run in" in str(e)
        return
    want = definition(q, keys, values, 0.125, True, None, 64, 8)
    assert not np.allclose(got, want, atol=1e-3, equal_nan=False)


def test_synchronization_faults_are_reported():
    """A barrier only some threads reach is an error, not a silent wrong answer."""
    src = """
    if (thread_position_in_grid.x < 16) { threadgroup_barrier(mem_flags::mem_threadgroup); }
    out[thread_position_in_grid.x] = x[thread_position_in_grid.x];
    """
    k = MetalKernel(name="half_barrier", input_names=["x"], output_names=["out"], source=src)
    with pytest.raises(EmulationError, match="barrier reached by only some threads"):
        k(inputs=[np.zeros(32, np.float32)], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)],
          output_dtypes=[mx.float32])


@pytest.mark.parametrize("src, message", [
    ("simdgroup_float8x8 a;", "simdgroup_float8x8"),
    ("atomic_fetch_add_explicit(p, 1, memory_order_relaxed);", "atomic"),
    ("float y = exp(x[0]);", "metal::exp"),
    ("float y = metal::tanh(x[0]);", "metal::tanh"),
    ("[[unroll]] for (;;) {}", "attributes"),
])
def test_outside_the_subset_is_refused(src, message):
    with pytest.raises(EmulationError, match=message):
        check_subset(src)


def test_kernels_stay_inside_the_subset():
    for spec in metal.specs().values():
        check_subset(spec["header"] + spec["source"] if "header" in spec else spec["source"])


PREFILL_CASES = [  # (head dim, q heads, kv heads, queries, keys, bits, group, causal, window)
    (64, 4, 2, 40, 40, 8, 64, True, None),  # a fresh prompt, two query tiles (the second partial)
    (128, 4, 1, 20, 150, 4, 32, True, None),  # a chunk over a cache, keys off the block size
    (64, 2, 2, 33, 200, 4, 64, True, 48),  # sliding window: early blocks skipped
    (96, 2, 1, 9, 61, 8, 32, False, None),
]


@pytest.mark.parametrize("D, Hq, Hkv, L, S, bits, group, causal, window", PREFILL_CASES)
def test_prefill_kernel_equals_definition(D, Hq, Hkv, L, S, bits, group, causal, window):
    q, keys, values = _inputs(D, Hq, Hkv, L, S, bits, group)
    got = metal.prefill_attention(q, keys, values, D**-0.5, causal, window, group, bits, kernel=MetalKernel)
    np.testing.assert_allclose(got, definition(q, keys, values, D**-0.5, causal, window, group, bits),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("old, new", [
    ("  threadgroup_barrier(mem_flags::mem_threadgroup);\n  for (int r = 0;", "  for (int r = 0;"),  # no barrier after staging
    ("int n = metal::min(BK, S - start);", "int n = metal::min(BK, S - start) - 1;"),  # a block's last row dropped
])
def test_broken_prefill_variants_fail(old, new):
    q, keys, values = _inputs(64, 2, 2, 33, 200, 4, 64)
    factory = _broken("sdpa_prefill_quantized", old, new)
    try:
        got = metal.prefill_attention(q, keys, values, 0.125, True, 48, 64, 4, kernel=factory)
    except EmulationError as e:
        assert "order threads run in" in str(e)
        return
    assert not np.allclose(got, definition(q, keys, values, 0.125, True, 48, 64, 4), atol=1e-3)


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs a Mac (Metal)")
@pytest.mark.parametrize("D, Hq, Hkv, L, S, bits, group, causal, window", CASES + PREFILL_CASES)
def test_real_metal_kernels_equal_definition(D, Hq, Hkv, L, S, bits, group, causal, window):
    q, keys, values = _inputs(D, Hq, Hkv, L, S, bits, group)
    got = metal.attention(q, keys, values, D**-0.5, causal, window, group, bits)
    np.testing.assert_allclose(np.array(got), definition(q, keys, values, D**-0.5, causal, window, group, bits),
                               atol=2e-5, rtol=1e-4)
