"""The GPU kernels, the Metal sources (metal_kernels/) and their CUDA twins (metal_kernels/cuda/), run
through the CPU emulators against the float64 definition on many shapes; deliberately broken variants
must fail, proving the harnesses can; and the emulators' subset checks refuse what they do not
implement. On a Mac (CUDA GPU) the same cases also run the real kernels through ``mx.fast.metal_kernel``
(``mx.fast.cuda_kernel``)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import mlx.core as mx

from cuda_emu import CudaKernel, check_cuda_subset, nvrtc, nvrtc_compile
from metal_emu import EmulationError, MetalKernel, check_subset
from mlxllm import backend
from mlxllm.kernels import gpu
from test_kernels import assert_attention, definition

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the kernel emulators need g++")
EMULATORS = {"metal": MetalKernel, "cuda": CudaKernel}
dialects = pytest.mark.parametrize("dialect", list(EMULATORS))

CASES = [  # (head dim, q heads, kv heads, queries, keys, bits, group, causal, window)
    (64, 4, 4, 1, 37, 8, 64, True, None),  # one split, GQA 1
    (128, 8, 2, 1, 300, 4, 32, True, None),  # GQA 4, keys off the block size
    (64, 8, 1, 8, 200, 4, 64, True, None),  # 8 speculative queries, GQA 8
    (96, 4, 1, 3, 150, 8, 32, True, None),
    (256, 2, 1, 2, 70, 4, 64, True, None),
    (64, 4, 2, 4, 260, 8, 32, True, 50),  # sliding window: whole splits see nothing
    (128, 4, 4, 1, 65, 2, 32, False, None),  # 2-bit, no mask
    (64, 4, 2, 8, 5, 4, 64, True, None),  # more queries than keys: the first 3 see none
]


def _inputs(D, Hq, Hkv, L, S, bits, group, dtype=mx.float32):
    q = mx.random.normal((1, Hq, L, D), key=mx.random.key(S)).astype(dtype)
    x_k = mx.random.normal((1, Hkv, S, D), key=mx.random.key(S + 1)).astype(dtype)
    x_v = mx.random.normal((1, Hkv, S, D), key=mx.random.key(S + 2)).astype(dtype)
    return q, mx.quantize(x_k, group, bits), mx.quantize(x_v, group, bits)


@dialects
@pytest.mark.parametrize("D, Hq, Hkv, L, S, bits, group, causal, window", CASES)
def test_decode_kernel_equals_definition(dialect, D, Hq, Hkv, L, S, bits, group, causal, window):
    q, keys, values = _inputs(D, Hq, Hkv, L, S, bits, group)
    got = gpu.decode_attention(q, keys, values, D**-0.5, causal, window, group, bits, dialect=dialect,
                               kernel=EMULATORS[dialect], block=64)
    assert_attention(got, definition(q, keys, values, D**-0.5, causal, window, group, bits))


@dialects
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_decode_kernel_half_precision(dialect, dtype):
    """Half-precision queries, scales and biases (the definition rounds the dequantized cache to ``dtype``,
    the kernels keep it in float32, hence bfloat16's looser bound)."""
    q, keys, values = _inputs(64, 4, 2, 2, 100, 8, 64, dtype)
    got = gpu.decode_attention(q, keys, values, 0.125, True, None, 64, 8, dialect=dialect, kernel=EMULATORS[dialect],
                               block=32)
    assert_attention(got, definition(q, keys, values, 0.125, True, None, 64, 8), atol=2e-3 if dtype == mx.float16 else 1e-2)


def _broken(dialect: str, name: str, old: str, new: str):
    """A kernel factory that serves ``name`` with one line of its source changed."""
    def factory(**spec):
        if spec["name"] == name:
            assert old in spec["source"]
            spec = {**spec, "name": name + "_broken", "source": spec["source"].replace(old, new)}
        return EMULATORS[dialect](**spec)
    return factory


BARRIER = {"metal": "threadgroup_barrier(mem_flags::mem_threadgroup);", "cuda": "__syncthreads();"}


@pytest.mark.parametrize("dialect, name, old, new", [
    ("metal", "sdpa_combine", BARRIER["metal"], ""),  # dropped barrier
    ("cuda", "sdpa_combine", BARRIER["cuda"], ""),
    ("metal", "sdpa_decode_quantized", "int start = split * BLOCK;", "int start = split * BLOCK + 1;"),  # off by one
    ("cuda", "sdpa_decode_quantized", "int start = split * BLOCK;", "int start = split * BLOCK + 1;"),
    ("metal", "sdpa_decode_quantized", "float s = simd_sum(partial);", "float s = partial;"),  # lost reduction
    ("cuda", "sdpa_decode_quantized", "float s = qkv_warp_sum(partial);", "float s = partial;"),
    ("metal", "sdpa_decode_quantized", "int qpos = S - NQ + qi % NQ;", "int qpos = S - NQ + qi % NQ - 1;"),  # mask shifted
    ("cuda", "sdpa_decode_quantized", "int qpos = S - NQ + qi % NQ;", "int qpos = S - NQ + qi % NQ - 1;"),
])
def test_broken_variants_fail(dialect, name, old, new):
    q, keys, values = _inputs(64, 4, 2, 2, 100, 8, 64)
    try:
        got = gpu.decode_attention(q, keys, values, 0.125, True, None, 64, 8, dialect=dialect,
                                   kernel=_broken(dialect, name, old, new), block=32)
    except EmulationError as e:  # the harness itself caught it (a race between thread orders)
        assert "order threads run in" in str(e)
        return
    want = definition(q, keys, values, 0.125, True, None, 64, 8)
    assert not np.allclose(got[0], want[0], atol=1e-3, equal_nan=False)


@pytest.mark.parametrize("dialect, src", [
    ("metal", """if (thread_position_in_grid.x < 16) { threadgroup_barrier(mem_flags::mem_threadgroup); }
                 out[thread_position_in_grid.x] = x[thread_position_in_grid.x];"""),
    ("cuda", """if (threadIdx.x < 16) { __syncthreads(); }
                out[threadIdx.x] = x[threadIdx.x];"""),
])
def test_synchronization_faults_are_reported(dialect, src):
    """A barrier only some threads reach is an error, not a silent wrong answer."""
    k = EMULATORS[dialect](name="half_barrier", input_names=["x"], output_names=["out"], source=src)
    with pytest.raises(EmulationError, match="barrier reached by only some threads"):
        k(inputs=[np.zeros(32, np.float32)], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)],
          output_dtypes=[mx.float32])


def test_cuda_blocks_are_full_size():
    """CUDA launches whole blocks (MLX rounds the grid up): threads past the grid run, unlike Metal's cut
    edge threadgroups, so a kernel that forgets to guard them writes out of range in CUDA."""
    src = "if (blockIdx.x * blockDim.x + threadIdx.x < 40) { out[blockIdx.x * blockDim.x + threadIdx.x] = float(blockDim.x); }"
    k = CudaKernel(name="full_blocks", input_names=["x"], output_names=["out"], source=src)
    (out,) = k(inputs=[np.zeros(1, np.float32)], grid=(40, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(40,)],
               output_dtypes=[mx.float32])
    assert (out == 32).all()


SUBSET_CHECKS = {"metal": check_subset, "cuda": check_cuda_subset}


@pytest.mark.parametrize("dialect, src, message", [
    ("metal", "simdgroup_float8x8 a;", "simdgroup_float8x8"),
    ("metal", "atomic_fetch_add_explicit(p, 1, memory_order_relaxed);", "atomic"),
    ("metal", "float y = exp(x[0]);", "metal::exp"),
    ("metal", "float y = metal::tanh(x[0]);", "metal::tanh"),
    ("metal", "[[unroll]] for (;;) {}", "attributes"),
    ("cuda", "atomicAdd(out, 1.0f);", "atomic"),
    ("cuda", "extern __shared__ float buf[];", "dynamic shared memory"),
    ("cuda", "auto g = cg::this_grid();", "cooperative groups"),
    ("cuda", "v += __shfl_xor_sync(0x0000ffff, v, 1);", "full-warp"),
    ("cuda", "unsigned b = __ballot_sync(0xffffffff, v > 0);", "warp votes"),
])
def test_outside_the_subset_is_refused(dialect, src, message):
    with pytest.raises(EmulationError, match=message):
        SUBSET_CHECKS[dialect](src)


@pytest.mark.skipif(nvrtc() is None, reason="NVRTC (pip nvidia-cuda-nvrtc-cu12) not installed")
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("D, bits, group, L", [(64, 4, 32, 1), (128, 8, 64, 8), (256, 2, 64, 40), (96, 4, 32, 3)])
def test_cuda_twins_compile_with_nvrtc(dtype, D, bits, group, L):
    """The CUDA sources, wrapped exactly as MLX's CUDA backend wraps them, compile with NVIDIA's own
    runtime compiler for the H100 (the emulator's g++ accepts some things NVRTC would not)."""
    q = mx.zeros((1, 4, L, D), dtype)
    keys = mx.quantize(mx.zeros((1, 2, 64, D), dtype), group, bits)
    inputs, template = gpu._shared(q, keys, keys, 0.1, True, None, group, bits)
    specs = gpu.specs("cuda")
    launches = [("sdpa_combine", [mx.float32] * 3, [3, 4, 4], [dtype, mx.float32], [("T", dtype), ("D", D)])]
    if L <= gpu.MAX_QUERIES:
        launches.append(("sdpa_decode_quantized", [a.dtype for a in inputs], [a.ndim for a in inputs],
                         [mx.float32] * 3, [*template, ("NQ", L), ("BLOCK", gpu.DECODE_BLOCK)]))
    else:
        launches.append(("sdpa_prefill_quantized", [a.dtype for a in inputs], [a.ndim for a in inputs],
                         [dtype, mx.float32], [*template, ("TQ", 32), ("BK", 4096 // D)]))
    for name, in_dtypes, in_ndims, out_dtypes, tmpl in launches:
        nvrtc_compile(CudaKernel(**specs[name]).mlx_source(in_dtypes, in_ndims, out_dtypes, tmpl))


@pytest.mark.skipif(nvrtc() is None, reason="NVRTC (pip nvidia-cuda-nvrtc-cu12) not installed")
def test_nvrtc_check_can_fail():
    with pytest.raises(EmulationError, match="identifier \"expf_typo\" is undefined"):
        nvrtc_compile("__global__ void k(float* o) { o[0] = expf_typo(1.0f); }")


def test_kernels_stay_inside_the_subsets():
    for dialect, check in SUBSET_CHECKS.items():
        for spec in gpu.specs(dialect).values():
            check(spec["header"] + spec["source"])


PREFILL_CASES = [  # (head dim, q heads, kv heads, queries, keys, bits, group, causal, window)
    (64, 4, 2, 40, 40, 8, 64, True, None),  # a fresh prompt, two query tiles (the second partial)
    (128, 4, 1, 20, 150, 4, 32, True, None),  # a chunk over a cache, keys off the block size
    (64, 2, 2, 33, 200, 4, 64, True, 48),  # sliding window: early blocks skipped
    (96, 2, 1, 9, 61, 8, 32, False, None),
    (64, 2, 1, 40, 30, 8, 64, True, None),  # more queries than keys: the first 10 see none
]


@dialects
@pytest.mark.parametrize("D, Hq, Hkv, L, S, bits, group, causal, window", PREFILL_CASES)
def test_prefill_kernel_equals_definition(dialect, D, Hq, Hkv, L, S, bits, group, causal, window):
    q, keys, values = _inputs(D, Hq, Hkv, L, S, bits, group)
    got = gpu.prefill_attention(q, keys, values, D**-0.5, causal, window, group, bits, dialect=dialect,
                                kernel=EMULATORS[dialect])
    assert_attention(got, definition(q, keys, values, D**-0.5, causal, window, group, bits))


@pytest.mark.parametrize("dialect, old, new", [
    ("metal", f"  {BARRIER['metal']}\n  for (int r = 0;", "  for (int r = 0;"),  # no barrier after staging
    ("cuda", f"  {BARRIER['cuda']}\n  for (int r = 0;", "  for (int r = 0;"),
    ("metal", "int n = metal::min(BK, S - start);", "int n = metal::min(BK, S - start) - 1;"),  # a block's last row dropped
    ("cuda", "int n = min(BK, S - start);", "int n = min(BK, S - start) - 1;"),
])
def test_broken_prefill_variants_fail(dialect, old, new):
    q, keys, values = _inputs(64, 2, 2, 33, 200, 4, 64)
    factory = _broken(dialect, "sdpa_prefill_quantized", old, new)
    try:
        got = gpu.prefill_attention(q, keys, values, 0.125, True, 48, 64, 4, dialect=dialect, kernel=factory)
    except EmulationError as e:
        assert "order threads run in" in str(e)
        return
    assert not np.allclose(got[0], definition(q, keys, values, 0.125, True, 48, 64, 4)[0], atol=1e-3)


@pytest.mark.skipif(backend.device_name() == "cpu", reason="needs a GPU backend (Metal or CUDA)")
@pytest.mark.parametrize("D, Hq, Hkv, L, S, bits, group, causal, window", CASES + PREFILL_CASES)
def test_real_gpu_kernels_equal_definition(D, Hq, Hkv, L, S, bits, group, causal, window):
    q, keys, values = _inputs(D, Hq, Hkv, L, S, bits, group)
    got = gpu.attention(q, keys, values, D**-0.5, causal, window, group, bits, dialect=backend.device_name())
    assert_attention(got, definition(q, keys, values, D**-0.5, causal, window, group, bits))
