// The Metal Shading Language subset mlxllm's kernels use, in C++20, for the emulation harness
// (tests/metal_emu.py), on the machine of emu_core.h. Anything outside the subset fails to compile, or
// is refused by the harness before compiling (see metal_kernels/README.md).
#pragma once

#include "emu_core.h"

// Address spaces: one flat memory here.
#define device
#define constant
#define thread
// `threadgroup` arrays are rewritten by the harness into per-threadgroup shared storage; pointers
// and references into them keep the qualifier, which means nothing here.
#define threadgroup

typedef _Float16 half;
typedef vec<half, 2> half2;
typedef vec<half, 4> half4;

namespace metal {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float abs(float x) { return std::fabs(x); }
inline float fast_exp(float x) { return std::exp(x); }
template <typename T> inline T max(T a, T b) { return a > b ? a : b; }
template <typename T> inline T min(T a, T b) { return a < b ? a : b; }
template <typename T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T> inline T select(T a, T b, bool c) { return c ? b : a; }
template <typename T> inline float dot(const T& a, const T& b) {
  float s = 0;
  for (int i = 0; i < int(sizeof(T) / sizeof(a[0])); i++) s += float(a[i]) * float(b[i]);
  return s;
}
template <typename T> struct numeric_limits;
template <> struct numeric_limits<float> {
  static constexpr float infinity() { return __builtin_inff(); }
  static constexpr float lowest() { return -3.402823466e38f; }
};
namespace fast {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
}  // namespace fast
}  // namespace metal

// --- Metal's synchronization and SIMD-group functions ---------------------------------------------

enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline mem_flags operator|(mem_flags a, mem_flags) { return a; }
inline void threadgroup_barrier(mem_flags) { emu::suspend(emu::State::AtBarrier); }
inline void simdgroup_barrier(mem_flags) {
  emu::simd_exchange(emu::SimdOp::Sum, 0.0);
}
template <typename T> inline T simd_sum(T v) { return emu::simd_exchange(emu::SimdOp::Sum, v); }
template <typename T> inline T simd_max(T v) { return emu::simd_exchange(emu::SimdOp::Max, v); }
template <typename T> inline T simd_min(T v) { return emu::simd_exchange(emu::SimdOp::Min, v); }
template <typename T> inline T simd_prefix_exclusive_sum(T v) { return emu::simd_exchange(emu::SimdOp::PrefixExclusiveSum, v); }
template <typename T> inline T simd_shuffle_xor(T v, ushort mask) { return emu::simd_exchange(emu::SimdOp::ShuffleXor, v, mask); }
template <typename T> inline T simd_shuffle(T v, ushort lane) { return emu::simd_exchange(emu::SimdOp::Shuffle, v, lane); }
template <typename T> inline T simd_shuffle_down(T v, ushort d) { return emu::simd_exchange(emu::SimdOp::ShuffleDown, v, d); }
template <typename T> inline T simd_shuffle_up(T v, ushort d) { return emu::simd_exchange(emu::SimdOp::ShuffleUp, v, d); }
template <typename T> inline T simd_broadcast(T v, ushort lane) { return emu::simd_exchange(emu::SimdOp::Broadcast, v, lane); }
