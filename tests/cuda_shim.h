// The CUDA subset mlxllm's kernel twins use (metal_kernels/cuda/), in C++20, for the emulation harness
// (tests/cuda_emu.py), on the machine of emu_core.h: a block is a threadgroup, a warp a SIMD group of
// 32 lanes. Anything outside the subset fails to compile, or is refused by the harness before
// compiling (see metal_kernels/README.md).
#pragma once

#include "emu_core.h"

#define __global__
#define __device__
#define __forceinline__ inline
#define __grid_constant__
// `__shared__` arrays are rewritten by the harness into per-block shared storage.

typedef _Float16 __half;
typedef bfloat16_t __nv_bfloat16;

// What MLX passes for `*_shape` / `*_strides` (cuda::std::array there; indexing is all the kernels do).
struct Shape {
  const int32_t* p;
  int32_t operator[](int i) const { return p[i]; }
};
struct Strides {
  const int64_t* p;
  int64_t operator[](int i) const { return p[i]; }
};

// Thread coordinates of the running fiber.
#define threadIdx (emu::self().tpitg)
#define blockIdx (emu::self().tgpig)
#define blockDim (emu::group->tptg)
#define gridDim (emu::group->tgpg)
#define warpSize emu::SIMD_WIDTH

// Device math: the float functions of <cmath> are already global; CUDA's integer min/max are too.
template <typename T> inline T min(T a, T b) { return a < b ? a : b; }
template <typename T> inline T max(T a, T b) { return a > b ? a : b; }

inline void __syncthreads() { emu::suspend(emu::State::AtBarrier); }

// Warp shuffles, full-warp mask only (the harness refuses other masks).
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask) { return emu::simd_exchange(emu::SimdOp::ShuffleXor, v, mask); }
template <typename T> inline T __shfl_sync(unsigned, T v, int lane) { return emu::simd_exchange(emu::SimdOp::Shuffle, v, lane); }
template <typename T> inline T __shfl_down_sync(unsigned, T v, unsigned d) { return emu::simd_exchange(emu::SimdOp::ShuffleDown, v, d); }
template <typename T> inline T __shfl_up_sync(unsigned, T v, unsigned d) { return emu::simd_exchange(emu::SimdOp::ShuffleUp, v, d); }
