"""Run ``mx.fast.cuda_kernel`` sources on the CPU: the CUDA twin of the Metal emulation harness.

``CudaKernel(**spec)(...)`` takes the arguments ``mx.fast.cuda_kernel`` and its call take and writes the
kernel MLX's CUDA backend would generate: a ``__global__`` function in ``mlx::core::cu`` with inputs
``const T*`` (plus ``Shape``/``Strides``/``int`` ``*_shape``/``*_strides``/``*_ndim`` arguments when the body
names them), outputs ``T*``, and the template values as ``constexpr`` / ``using`` lines opening the body.
It compiles that against ``cuda_shim.h`` and runs it on the same fiber machine as the Metal harness
(``emu_core.h``): full-size blocks as CUDA launches them (grid = ceil(threads / block)), warps of 32
lanes whose shuffles really exchange, ``__syncthreads`` a real barrier, both thread orders compared.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import mlx.core as mx

from metal_emu import EmulationError, MetalKernel

CUDA_SHIM = Path(__file__).with_name("cuda_shim.h")
_CTYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.uint32: "uint32_t",
           mx.int32: "int32_t", mx.uint8: "uint8_t", mx.int64: "int64_t", mx.bool_: "bool"}
_REFUSED = [
    (r"\batomic\w*", "atomics"),
    (r"\bextern\s+__shared__", "dynamic shared memory"),
    (r"\bcg::|cooperative_groups", "cooperative groups"),
    (r"\basm\b", "inline assembly"),
    (r"\b(?:wmma|mma)\b", "tensor-core matrix operations"),
    (r"\btex\w*\b|\bsurf\w*\b", "textures and surfaces"),
    (r"\b__(?:ballot|any|all|activemask|match_\w+)_sync\b", "warp votes"),
    (r"\b__syncwarp\b", "__syncwarp"),
    (r"\busing\s+namespace\b", "using namespace"),
]
_SHARED_DECL = re.compile(r"\b__shared__\s+([A-Za-z_][\w:]*)\s+([A-Za-z_]\w*)\s*((?:\[[^\]]+\])+)\s*;")


def check_cuda_subset(source: str) -> None:
    """Refuse CUDA constructs the shim does not implement, naming the first one found."""
    for pattern, what in _REFUSED:
        m = re.search(pattern, source)
        if m:
            raise EmulationError(f"'{m.group(0)}' is outside the emulated CUDA subset ({what}); see metal_kernels/README.md")
    for m in re.finditer(r"__shfl\w*_sync\s*\(\s*([^,]+),", source):
        if m.group(1).strip().lower() not in ("0xffffffff", "0xffffffffu"):
            raise EmulationError(f"'{m.group(0)}': only full-warp shuffles (mask 0xffffffff) are emulated")


class CudaKernel(MetalKernel):
    """Same constructor arguments as ``mx.fast.cuda_kernel``; calling it runs the emulation."""

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str = "", ensure_row_contiguous: bool = True, shared_memory: int = 0):
        if shared_memory:
            raise EmulationError("dynamic shared memory is outside the emulated CUDA subset")
        check_cuda_subset(header + source)
        self.name, self.inputs, self.outputs = name, list(input_names), list(output_names)
        self.source, self.header, self.contiguous = source, header, ensure_row_contiguous

    def _signature(self, in_dtypes: list[mx.Dtype], in_ndims: list[int], out_dtypes: list[mx.Dtype],
                   template: Sequence[tuple[str, Any]]) -> tuple[list[str], list[str], list[str], list[str]]:
        """MLX's kernel parameters, the buffers they take in order with each one's kind (pointer cast,
        Shape, Strides or int), and the lines declaring the template values."""
        params, buffers, kinds = [], [], []
        for name, ndim, dt in zip(self.inputs, in_ndims, in_dtypes):
            params.append(f"const {_CTYPES[dt]}* {name}")
            buffers.append(name)
            kinds.append(f"(const {_CTYPES[dt]}*)")
            if ndim > 0:
                for suffix, ty in (("shape", "Shape"), ("strides", "Strides"), ("ndim", "int")):
                    if f"{name}_{suffix}" in self.source:
                        params.append(f"const __grid_constant__ {ty} {name}_{suffix}")
                        buffers.append(f"{name}_{suffix}")
                        kinds.append(ty)
        for name, dt in zip(self.outputs, out_dtypes):
            params.append(f"{_CTYPES[dt]}* {name}")
            buffers.append(name)
            kinds.append(f"({_CTYPES[dt]}*)")
        consts = []
        for name, value in template:
            if isinstance(value, mx.Dtype):
                consts.append(f"  using {name} = {_CTYPES[value]};")
            elif isinstance(value, bool):
                consts.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
            else:
                consts.append(f"  constexpr int {name} = {int(value)};")
        return params, buffers, kinds, consts

    def mlx_source(self, in_dtypes: list[mx.Dtype], in_ndims: list[int], out_dtypes: list[mx.Dtype],
                   template: Sequence[tuple[str, Any]]) -> str:
        """The translation unit as MLX's CUDA backend writes it (after its own default header)."""
        params, _, _, consts = self._signature(in_dtypes, in_ndims, out_dtypes, template)
        return (f"{self.header}\nnamespace mlx::core::cu {{\n\nnamespace cg = cooperative_groups;\n\n"
                f"__global__ void {self.name}(\n    " + ",\n    ".join(params) + ") {\n" + "\n".join(consts)
                + f"\n\n{self.source}\n}}\n\n}} // namespace mlx::core::cu\n")

    def _cpp(self, inputs: list[np.ndarray], in_dtypes: list[mx.Dtype], out_dtypes: list[mx.Dtype],
             template: Sequence[tuple[str, Any]]) -> tuple[str, list[str]]:
        params, buffers, kinds, consts = self._signature(in_dtypes, [a.ndim for a in inputs], out_dtypes, template)
        n_shared = 0

        def shared(m: re.Match) -> str:
            nonlocal n_shared
            n_shared += 1
            return f"auto& {m.group(2)} = emu::tg_shared<{m.group(1)}{m.group(3)}>({n_shared - 1});"

        body = _SHARED_DECL.sub(shared, self.source)
        if "__shared__" in body:
            raise EmulationError("a __shared__ declaration the harness cannot rewrite (write `__shared__ T name[N]...;`)")
        call_args = []
        for i, kind in enumerate(kinds):
            if kind == "int":
                call_args.append(f"*(const int*)bufs[{i}]")
            elif kind == "Shape":
                call_args.append(f"Shape{{(const int32_t*)bufs[{i}]}}")
            elif kind == "Strides":
                call_args.append(f"Strides{{(const int64_t*)bufs[{i}]}}")
            else:
                call_args.append(f"{kind}bufs[{i}]")
        sig = ",\n    ".join(params)
        cpp = (f'#include "{CUDA_SHIM}"\n{self.header}\nnamespace mlx::core::cu {{\n\n'
               + f"__global__ void {self.name}(\n    {sig}) {{\n" + "\n".join(consts) + f"\n\n{body}\n}}\n\n}}\n"
               + 'extern "C" const char* run(void** bufs, unsigned gx, unsigned gy, unsigned gz, '
               + 'unsigned tx, unsigned ty, unsigned tz, int reverse) {\n'
               + "  static std::string error;\n  try {\n"
               + f"    emu::launch(uint3(gx, gy, gz), uint3(tx, ty, tz), {n_shared}, reverse, [&](emu::Thread&) {{\n"
               + f"      mlx::core::cu::{self.name}({', '.join(call_args)});\n    }}, true);\n"
               + "  } catch (const std::exception& e) { error = e.what(); return error.c_str(); }\n  return nullptr;\n}\n")
        return cpp, buffers


# What MLX's CUDA backend puts before every custom kernel (its default header and device utils), reduced
# to what the kernels can see: the half types, cooperative groups, ``inf`` and ``Shape``/``Strides``.
NVRTC_PRELUDE = """#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include <cuda/std/array>
#define inf cuda::std::numeric_limits<float>::infinity()
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 8>;
using Strides = cuda::std::array<int64_t, 8>;
}
"""


def nvrtc() -> tuple[Any, list[str]] | None:
    """NVIDIA's runtime compiler and its include folders from the pip packages (test extras), or None."""
    import ctypes
    import importlib.util

    roots = {}
    for pkg in ("cuda_nvrtc", "cuda_runtime", "cuda_cccl"):
        spec = importlib.util.find_spec(f"nvidia.{pkg}")
        if spec is None or not spec.submodule_search_locations:
            return None
        roots[pkg] = Path(list(spec.submodule_search_locations)[0])
    libs = sorted((roots["cuda_nvrtc"] / "lib").glob("libnvrtc.so*"))
    if not libs:
        return None
    return ctypes.CDLL(str(libs[0])), [str(roots["cuda_runtime"] / "include"), str(roots["cuda_cccl"] / "include")]


def nvrtc_compile(source: str, arch: str = "compute_90") -> None:
    """Compile ``source`` (after ``NVRTC_PRELUDE``) with NVRTC, raising EmulationError with its log on failure."""
    import ctypes

    found = nvrtc()
    if found is None:
        raise EmulationError("NVRTC is not installed (pip packages nvidia-cuda-nvrtc-cu12, -runtime-cu12, -cccl-cu12)")
    lib, includes = found
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), (NVRTC_PRELUDE + source).encode(), b"kernel.cu", 0, None, None):
        raise EmulationError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", *(f"-I{i}".encode() for i in includes)]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if rc:
        raise EmulationError("NVRTC rejects the kernel:\n" + log.value.decode(errors="replace")[-4000:])
