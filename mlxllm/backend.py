"""Which MLX backend runs, and the Linux CPU fast path.

MLX's Linux CPU wheel bundles a slow reference BLAS. Loading the system OpenBLAS with RTLD_GLOBAL
*before* ``mlx.core`` is first imported makes MLX's ``cblas_sgemm`` calls resolve to it (the speedup
is measured in the README, "The Linux CPU fast path"). This module must therefore be
imported before anything imports ``mlx.core``; ``mlxllm/__init__.py`` does that first.
Set ``MLXLLM_BLAS=0`` to keep the bundled BLAS, or ``MLXLLM_BLAS=/path/libfoo.so`` to choose one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

_CANDIDATES = ("libopenblas.so.0", "libopenblas.so", "libopenblasp-r0.so")

blas_library: str | None = None  # what was preloaded, for --verbose and bench reports


def _preload_blas() -> None:
    global blas_library
    choice = os.environ.get("MLXLLM_BLAS", "auto")
    if choice == "0" or sys.platform != "linux":
        return
    if "mlx.core" in sys.modules:  # too late: MLX already bound its BLAS symbols
        return
    names = _CANDIDATES if choice == "auto" else (choice,)
    for name in names:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        blas_library = name
        return


_preload_blas()

import mlx.core as mx  # noqa: E402  (must come after the preload)


def device_name() -> str:
    """'metal', 'cuda' or 'cpu': the backend MLX's default device runs on."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def device_memory() -> int:
    """Bytes of memory the model may use on the default device."""
    backend = device_name()
    if backend == "metal":
        info = mx.metal.device_info()
        return int(info.get("max_recommended_working_set_size", info["memory_size"]))
    if backend == "cuda":
        try:
            return int(mx.cuda.device_info()["total_memory"])  # type: ignore[attr-defined]
        except Exception:  # older MLX without device_info on CUDA: fall through to host memory
            pass
    return _available_host_memory()


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def describe() -> dict[str, object]:
    """Machine and backend facts for --verbose and benchmark reports."""
    return {
        "backend": device_name(),
        "blas": blas_library or ("bundled" if device_name() == "cpu" else None),
        "mlx": mx.__version__,
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(device_memory() / 2**30, 1),
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    if sys.platform == "darwin":
        try:
            import subprocess

            return subprocess.check_output(["sysctl", "-n", "machdep.cpu.brand_string"], text=True).strip()
        except Exception:
            return platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def memory_limit(fraction: float = 0.9) -> int:
    """The default ``--max-memory``: what the device can hold (on Metal its recommended working set,
    elsewhere ``fraction`` of physical memory)."""
    try:
        if mx.metal.is_available():
            return int(mx.metal.device_info()["max_recommended_working_set_size"])
    except (AttributeError, KeyError, RuntimeError):
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * fraction)


def rank_group() -> mx.distributed.Group | None:
    """The ``mx.distributed`` group this process runs in (more than one rank under ``mlx.launch``), or None
    where MLX was built without distributed support."""
    return mx.distributed.init() if mx.distributed.is_available() else None
