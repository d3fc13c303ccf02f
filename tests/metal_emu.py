"""Run ``mx.fast.metal_kernel`` sources on the CPU: the Metal-on-CPU emulation harness.

``MetalKernel(**spec)(inputs=..., template=..., grid=..., threadgroup=..., output_shapes=...,
output_dtypes=...)`` takes the exact arguments ``mx.fast.metal_kernel`` and its call take, writes the
kernel signature MLX would generate (inputs ``const device T*``, outputs ``device T*``, ``*_shape`` /
``*_strides`` / ``*_ndim`` when the body names them, the template parameters, the thread-position
attributes the body uses), compiles it as C++ with g++ against ``metal_shim.h`` and runs the whole grid,
every threadgroup's threads live at once as fibers so barriers and SIMD-group operations synchronize.
Constructs outside the emulated subset are refused before compiling (metal_kernels/README.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import mlx.core as mx

SHIM = Path(__file__).with_name("metal_shim.h")
CACHE = Path(tempfile.gettempdir()) / "mlxllm-metal-emu"

_CTYPES = {mx.float32: "float", mx.float16: "half", mx.bfloat16: "bfloat16_t", mx.uint32: "uint32_t",
           mx.int32: "int32_t", mx.uint8: "uint8_t", mx.int64: "int64_t", mx.bool_: "bool"}
_NUMPY = {mx.float32: np.float32, mx.float16: np.float16, mx.uint32: np.uint32, mx.int32: np.int32,
          mx.uint8: np.uint8, mx.int64: np.int64, mx.bool_: np.bool_}
# The attributes MLX adds to the signature when the body names them.
_ATTRIBUTES = {
    "thread_position_in_grid": ("uint3", "__t.tpig"), "threads_per_grid": ("uint3", "emu::group->tpg"),
    "thread_position_in_threadgroup": ("uint3", "__t.tpitg"), "threads_per_threadgroup": ("uint3", "emu::group->tptg"),
    "threadgroup_position_in_grid": ("uint3", "__t.tgpig"), "threadgroups_per_grid": ("uint3", "emu::group->tgpg"),
    "thread_index_in_threadgroup": ("uint", "__t.tiitg"), "thread_index_in_simdgroup": ("uint", "__t.lane"),
    "simdgroup_index_in_threadgroup": ("uint", "__t.sgitg"),
    "simdgroups_per_threadgroup": ("uint", "emu::group->n_simdgroups"),
    "threads_per_simdgroup": ("uint", "uint(emu::SIMD_WIDTH)"),
}
_MATH = ("exp", "exp2", "log", "sqrt", "rsqrt", "abs", "fast_exp", "max", "min", "clamp", "select", "dot")
_REFUSED = [
    (r"\bsimdgroup_(?:matrix|float8x8|half8x8|multiply)", "simdgroup matrices"),
    (r"\batomic", "atomics"),
    (r"\b(?:texture\w*|sampler)\b", "textures and samplers"),
    (r"\[\[", "attributes ([[...]]): MLX writes the signature"),
    (r"\bimageblock", "imageblocks"),
    (r"\bsimd_(?:ballot|vote|all|any|is_first|active_threads_mask)\b", "SIMD votes and ballots"),
    (r"\bquad_\w+", "quad-group functions"),
    (r"\busing\s+namespace\b", "using namespace"),
]
_TG_DECL = re.compile(r"\bthreadgroup\s+([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s+([A-Za-z_]\w*)\s*((?:\[[^\]]+\])+)\s*;")


class EmulationError(RuntimeError):
    """A kernel outside the emulated subset, a compile error, or a synchronization fault at run time."""


def check_subset(source: str) -> None:
    """Refuse Metal constructs the shim does not implement, naming the first one found."""
    for pattern, what in _REFUSED:
        m = re.search(pattern, source)
        if m:
            raise EmulationError(f"'{m.group(0)}' is outside the emulated Metal subset ({what}); see metal_kernels/README.md")
    m = re.search(r"(?<![\w:.])(" + "|".join(_MATH) + r")\s*\(", source)
    if m:
        raise EmulationError(f"call '{m.group(1)}' as 'metal::{m.group(1)}' (the emulated subset has no bare math names)")
    for m in re.finditer(r"metal::(?:fast::)?(\w+)", source):
        if m.group(1) not in (*_MATH, "numeric_limits", "fast"):
            raise EmulationError(f"'metal::{m.group(1)}' is outside the emulated Metal subset; see metal_kernels/README.md")


def _template_decl(template: Sequence[tuple[str, Any]]) -> tuple[str, str]:
    params, args = [], []
    for name, value in template:
        if isinstance(value, mx.Dtype):
            params.append(f"typename {name}")
            args.append(_CTYPES[value])
        elif isinstance(value, bool):
            params.append(f"bool {name}")
            args.append("true" if value else "false")
        else:
            params.append(f"int {name}")
            args.append(str(int(value)))
    return ", ".join(params), ", ".join(args)


class MetalKernel:
    """Same constructor arguments as ``mx.fast.metal_kernel``; calling it runs the emulation."""

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str = "", ensure_row_contiguous: bool = True, atomic_outputs: bool = False):
        if atomic_outputs:
            raise EmulationError("atomic outputs are outside the emulated subset")
        check_subset(header + source)
        self.name, self.inputs, self.outputs = name, list(input_names), list(output_names)
        self.source, self.header, self.contiguous = source, header, ensure_row_contiguous

    def _cpp(self, inputs: list[np.ndarray], in_dtypes: list[mx.Dtype], out_dtypes: list[mx.Dtype],
             template: Sequence[tuple[str, Any]]) -> tuple[str, list[str]]:
        """The C++ translation unit and the order of the buffers ``run`` takes."""
        params, buffers, n_shared = [], [], 0
        for name, a, dt in zip(self.inputs, inputs, in_dtypes):
            params.append(f"const device {_CTYPES[dt]}* {name}")
            buffers.append(name)
            if f"{name}_shape" in self.source:
                params.append(f"const constant int* {name}_shape")
                buffers.append(f"{name}_shape")
            if f"{name}_strides" in self.source and not self.contiguous:
                params.append(f"const constant int64_t* {name}_strides")
                buffers.append(f"{name}_strides")
            if f"{name}_ndim" in self.source:
                params.append(f"const constant int& {name}_ndim")
                buffers.append(f"{name}_ndim")
        for name, dt in zip(self.outputs, out_dtypes):
            params.append(f"device {_CTYPES[dt]}* {name}")
            buffers.append(name)

        def shared(m: re.Match) -> str:
            nonlocal n_shared
            n_shared += 1
            return f"auto& {m.group(2)} = emu::tg_shared<{m.group(1)}{m.group(3)}>({n_shared - 1});"

        body = _TG_DECL.sub(shared, self.source)
        attrs = "".join(f"  {ty} {name} = {expr};\n" for name, (ty, expr) in _ATTRIBUTES.items()
                        if re.search(rf"\b{name}\b", body))
        tparams, targs = _template_decl(template)
        call_args = []
        for b in buffers:
            if b.endswith("_ndim"):
                call_args.append(f"*(const int*)bufs[{len(call_args)}]")
            else:
                ptype = next(p for p in params if re.search(rf"\b{re.escape(b)}$", p)).rsplit(" ", 1)[0]
                call_args.append(f"({ptype})bufs[{len(call_args)}]")
        sig = ",\n    ".join([*params, "emu::Thread& __t"])
        cpp = (f'#include "{SHIM}"\n{self.header}\n'
               + (f"template <{tparams}>\n" if tparams else "")
               + f"void {self.name}(\n    {sig}) {{\n{attrs}{body}\n}}\n"
               + 'extern "C" const char* run(void** bufs, unsigned gx, unsigned gy, unsigned gz, unsigned tx, unsigned ty, unsigned tz, int reverse) {\n'
               + "  static std::string error;\n  try {\n"
               + f"    emu::launch(uint3(gx, gy, gz), uint3(tx, ty, tz), {n_shared}, reverse, [&](emu::Thread& __t) {{\n"
               + f"      {self.name}{'<' + targs + '>' if tparams else ''}({', '.join([*call_args, '__t'])});\n    }});\n"
               + "  } catch (const std::exception& e) { error = e.what(); return error.c_str(); }\n  return nullptr;\n}\n")
        return cpp, buffers

    def __call__(self, *, inputs: Sequence[Any], template: Sequence[tuple[str, Any]] = (), grid: tuple[int, int, int],
                 threadgroup: tuple[int, int, int], output_shapes: Sequence[Sequence[int]],
                 output_dtypes: Sequence[mx.Dtype], init_value: float | None = None, **_: Any) -> list[np.ndarray]:
        arrays = [mx.array(a) if not isinstance(a, mx.array) else a for a in inputs]
        in_dtypes = [a.dtype for a in arrays]
        host = [_to_host(a) for a in arrays]
        cpp, buffers = self._cpp(host, in_dtypes, list(output_dtypes), template)
        lib = _compile(cpp)
        runs = [self._run(lib, buffers, host, output_shapes, output_dtypes, init_value, grid, threadgroup, reverse)
                for reverse in (False, True)]
        for a, b in zip(*runs):
            if not np.array_equal(a, b, equal_nan=True):
                raise EmulationError(f"{self.name}: the result depends on the order threads run in "
                                     "(threadgroup memory read without a barrier after its write?)")
        return [_from_host(o, dt) for o, dt in zip(runs[0], output_dtypes)]

    def _run(self, lib, buffers, host, output_shapes, output_dtypes, init_value, grid, threadgroup,
             reverse: bool) -> list[np.ndarray]:
        outs = []
        for shape, dt in zip(output_shapes, output_dtypes):
            if init_value is not None:
                outs.append(np.full(shape, init_value, dtype=_host_dtype(dt)))
            else:  # Metal does not initialize outputs: a NaN pattern makes unwritten elements visible
                outs.append(np.frombuffer(b"\xff" * (int(np.prod(shape)) * _host_dtype(dt)().itemsize),
                                          dtype=_host_dtype(dt)).reshape(shape).copy())
        keep, ptrs = [], []
        named = dict(zip(self.inputs, host))
        for b in buffers:
            if b in named:
                arr = named[b]
            elif b in self.outputs:
                arr = outs[self.outputs.index(b)]
            elif b.endswith("_shape"):
                arr = np.array(named[b[: -len("_shape")]].shape, dtype=np.int32)
            elif b.endswith("_strides"):
                src = named[b[: -len("_strides")]]
                arr = np.array([s // src.itemsize for s in src.strides], dtype=np.int64)
            else:  # _ndim
                arr = np.array(named[b[: -len("_ndim")]].ndim, dtype=np.int32)
            arr = np.ascontiguousarray(arr)
            keep.append(arr)
            ptrs.append(arr.ctypes.data_as(ctypes.c_void_p))
        argv = (ctypes.c_void_p * len(ptrs))(*ptrs)
        err = lib.run(argv, *grid, *threadgroup, int(reverse))
        if err:
            raise EmulationError(f"{self.name}: {err.decode()}")
        return outs


def _host_dtype(dt: mx.Dtype):
    return np.uint16 if dt == mx.bfloat16 else _NUMPY[dt]


def _to_host(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.ascontiguousarray(np.array(a))


def _from_host(o: np.ndarray, dt: mx.Dtype) -> np.ndarray:
    if dt == mx.bfloat16:
        return np.array(mx.array(o).view(mx.bfloat16).astype(mx.float32))
    return o


_LOADED: dict[str, ctypes.CDLL] = {}


def _compile(cpp: str) -> ctypes.CDLL:
    """Compile once per distinct source (cached on disk by hash); g++ errors become EmulationError."""
    key = hashlib.sha256((cpp + "".join(h.read_text() for h in sorted(SHIM.parent.glob("*.h")))).encode()).hexdigest()[:20]
    if key in _LOADED:
        return _LOADED[key]
    if shutil.which("g++") is None:
        raise EmulationError("g++ is needed to emulate GPU kernels")
    CACHE.mkdir(parents=True, exist_ok=True)
    so = CACHE / f"{key}.so"
    if not so.exists():
        src = CACHE / f"{key}.cpp"
        src.write_text(cpp)
        tmp = CACHE / f"{key}.{id(cpp)}.so"
        proc = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-o", str(tmp), str(src)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise EmulationError("kernel does not compile against the emulation shim:\n" + proc.stderr[-4000:])
        tmp.replace(so)
    lib = ctypes.CDLL(str(so))
    lib.run.restype = ctypes.c_char_p
    lib.run.argtypes = [ctypes.POINTER(ctypes.c_void_p)] + [ctypes.c_uint] * 6 + [ctypes.c_int]
    _LOADED[key] = lib
    return lib
