"""The device peaks ``mlxllm bench`` divides by: the memory read bandwidth and the matmul throughput
MLX reaches on this device right now, and Apple's published bandwidth to show next to them.

Decode's ceiling is how fast weights stream into matrix-vector products, so the read peak is the best
of several ways of reading one buffer larger than the last-level cache, run as decode runs: MLX ops on
the default device, with the threads they use there (BLAS's for a CPU matmul). The buffer is read as a
reduction (also split across one CPU stream per core, since one reduction is one thread), as one big
GEMV in each orientation, and in decode's own shape: a chain of GEMVs over distinct transformer-sized
blocks of it, evaluated as one lazy graph, as ``x @ W.T`` (what ``nn.Linear`` computes) and as
``W @ x``. No single method is fastest everywhere (BLAS reads one big matrix differently from many small
ones, and each orientation differently), and a denominator below what decode itself reaches once showed
decode above 100 % of "peak". The methods take turns, best run of each, so a load spike hits them
alike; every method's figure is reported next to the best.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, Callable

import mlx.core as mx

from ... import backend

# Apple's published unified-memory bandwidth (GB/s) by chip name; "Max" parts list the larger
# configuration. Shown next to the measured figure, never used as the denominator.
PUBLISHED_GBPS = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": 546,
}

BLOCK = (1536, 576)  # [intermediate, hidden] of a small transformer: decode's typical weight matrix


def best_times(fns: dict[str, Callable[[], Any]], rounds: int = 3, max_s: float = 3.0) -> dict[str, float]:
    """Fastest wall time of each ``fn`` (evaluated). The functions take turns for ``rounds`` rounds, or
    fewer once ``max_s`` seconds are spent (one round at least); the first round doubles as warm-up,
    since only each one's fastest run counts."""
    best = dict.fromkeys(fns, math.inf)
    spent = 0.0
    for i in range(rounds):
        if i and spent >= max_s:
            break
        for name, fn in fns.items():
            t = time.perf_counter()
            mx.eval(fn())
            dt = time.perf_counter() - t
            best[name], spent = min(best[name], dt), spent + dt
    return best


def gemv_blocks(flat: mx.array, shape: tuple[int, int] = BLOCK) -> list[mx.array]:
    """Views of the 1-D ``flat`` as distinct weight matrices, alternately ``shape`` and its transpose's
    shape, as a layer's up and down projections alternate (no copy: each is a contiguous slice)."""
    rows, cols = shape
    size = rows * cols
    return [flat[i * size:(i + 1) * size].reshape((rows, cols) if i % 2 == 0 else (cols, rows))
            for i in range(flat.size // size)]


def gemv_chain(blocks: list[mx.array], x: mx.array, orientation: str = "x@W.T") -> mx.array:
    """One decode-shaped lazy graph: ``x`` ([vectors, in]) through every block in turn, as
    ``x @ W.T`` (what ``nn.Linear`` computes) or ``W @ x``."""
    h = x
    for w in blocks:
        h = h @ w.T if orientation == "x@W.T" else (w @ h.T).T
    return h


def _chain_buffer(dtype: mx.Dtype, numbers: int, tile: int = 2**20) -> mx.array:
    """A buffer whose blocks keep a chain's activations near 1 (no overflow, no denormals): zero-mean
    entries with a standard deviation of (rows x cols) ** -1/4 per block. One random tile repeated,
    which reads as fast as all-random data and fills in a fraction of the time."""
    half = math.sqrt(3) * (BLOCK[0] * BLOCK[1]) ** -0.25  # uniform on [-half, half) has that deviation
    pattern = mx.random.uniform(-half, half, shape=(tile,), dtype=dtype)
    return mx.tile(pattern, (-(-numbers // tile),))[:numbers]


@functools.cache
def _cpu_streams() -> tuple[Any, ...]:
    """On the CPU backend, one stream per core (up to 8): each runs its ops on its own thread."""
    if backend.device_name() != "cpu":
        return ()
    return tuple(mx.new_stream(mx.cpu) for _ in range(min(os.cpu_count() or 1, 8)))


def _parallel_sum(a: mx.array, streams: tuple[Any, ...]) -> list[mx.array]:
    """A reduction split by rows across ``streams``, so several threads read at once."""
    rows = a.shape[0] // len(streams)
    return [mx.sum(a[i * rows:(i + 1) * rows], stream=s) for i, s in enumerate(streams)]


def _read_methods(flat: mx.array, cols: int = 4096) -> dict[str, tuple[int, Callable[[], Any]]]:
    """Every way of reading ``flat`` once: name -> (bytes read, the op)."""
    dtype = flat.dtype
    a = flat[: flat.size // cols * cols].reshape(-1, cols)
    v, u, x = mx.ones((cols, 1), dtype), mx.ones((1, a.shape[0]), dtype), mx.ones((1, BLOCK[1]), dtype)
    blocks = gemv_blocks(flat)
    chain_bytes = sum(w.nbytes for w in blocks)
    mx.eval(v, u, x)
    methods: dict[str, tuple[int, Callable[[], Any]]] = {
        "reduction": (a.nbytes, lambda: mx.sum(a)),
        "matrix-vector": (a.nbytes, lambda: a @ v),  # A @ v
        "vector-matrix": (a.nbytes, lambda: u @ a),  # v @ A
        "vector-matrix, transposed": (a.nbytes, lambda: v.T @ a.T),  # v @ A.T, as a tied head reads
        "GEMV chain x @ W.T": (chain_bytes, lambda: gemv_chain(blocks, x)),
        "GEMV chain W @ x": (chain_bytes, lambda: gemv_chain(blocks, x, "W@x")),
    }
    streams = _cpu_streams()
    if len(streams) > 1:
        methods[f"reduction, {len(streams)} threads"] = (a.nbytes, lambda: _parallel_sum(a, streams))
    return methods


def read_bandwidths(flat: mx.array, rounds: int = 3) -> dict[str, float]:
    """GB/s of every read method over the buffer ``flat``, best of ``rounds`` taken in turns."""
    methods = _read_methods(flat)
    times = best_times({name: fn for name, (_, fn) in methods.items()}, rounds=rounds)
    return {name: nbytes / times[name] / 1e9 for name, (nbytes, _) in methods.items()}


def _copy_gbps(flat: mx.array) -> float:
    """``y = x + 1`` over ``flat``, counted as read + write."""
    return 2 * flat.nbytes / 1e9 / best_times({"copy": lambda: flat + 1}, rounds=2)["copy"]


def _matmul_gflops(dtype: mx.Dtype, size: int = 2048) -> float:
    x, y = (mx.random.uniform(shape=(size, size)).astype(dtype) for _ in range(2))
    mx.eval(x, y)
    return 2 * size**3 / best_times({"matmul": lambda: x @ y}, rounds=3)["matmul"] / 1e9


def measure_peaks(dtype: mx.Dtype = mx.float32, mbytes: int = 512) -> dict[str, Any]:
    """Memory bandwidth and matmul throughput MLX reaches on this device right now.

    read: the best of ``read_bandwidths`` over ``mbytes`` of ``dtype`` (every method's figure is in
    ``read_gbps_by_method``); copy: ``y = x + 1`` counted as read + write; matmul: 2048^2 x 2048.
    """
    flat = _chain_buffer(dtype, mbytes * 2**20 // dtype.size)
    mx.eval(flat)
    read = read_bandwidths(flat)
    method = max(read, key=read.get)
    peaks = {
        "read_gbps": read[method],
        "read_method": method,
        "read_gbps_by_method": read,
        "copy_gbps": _copy_gbps(flat),
        "matmul_gflops": _matmul_gflops(dtype),
        "dtype": str(dtype).removeprefix("mlx.core."),
        "buffer_mb": mbytes,
    }
    del flat
    mx.clear_cache()  # hand the probe's buffers back before the model runs
    return peaks


def published_bandwidth() -> tuple[str, float] | None:
    """Apple's published bandwidth for the chip MLX runs on (Metal only)."""
    if backend.device_name() != "metal":
        return None
    name = str(mx.metal.device_info().get("device_name", ""))
    chip = name.removeprefix("Apple ").strip()
    return (name, PUBLISHED_GBPS[chip]) if chip in PUBLISHED_GBPS else None
