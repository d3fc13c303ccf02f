// What the Metal and CUDA emulation shims share (tests/metal_shim.h, tests/cuda_shim.h): bfloat16,
// the small vector types thread positions use, and the emulated machine. Every thread of a threadgroup
// (CUDA: block) is a fiber (ucontext) of one OS thread; a barrier or SIMD-group (warp) operation
// suspends the fiber until every thread it synchronizes with has arrived, so these really synchronize.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>
#include <ucontext.h>

typedef uint32_t uint;
typedef uint16_t ushort;

// bfloat16 as Metal, CUDA and MLX store it: the high half of a float32, rounded to nearest even.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = uint16_t((u >> 16) | 0x40); return; }  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = uint16_t(u >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// Vector types: components, elementwise arithmetic, the swizzles the kernels use (.xy).
template <typename T, int N> struct vec;
#define MLXLLM_VEC_OPS(N)                                                                        \
  T& operator[](int i) { return (&x)[i]; }                                                       \
  const T& operator[](int i) const { return (&x)[i]; }                                           \
  friend vec operator+(vec a, const vec& b) { for (int i = 0; i < N; i++) a[i] += b[i]; return a; } \
  friend vec operator-(vec a, const vec& b) { for (int i = 0; i < N; i++) a[i] -= b[i]; return a; } \
  friend vec operator*(vec a, const vec& b) { for (int i = 0; i < N; i++) a[i] *= b[i]; return a; } \
  friend vec operator*(vec a, T s) { for (int i = 0; i < N; i++) a[i] *= s; return a; }           \
  friend vec operator*(T s, vec a) { for (int i = 0; i < N; i++) a[i] *= s; return a; }           \
  friend vec operator/(vec a, T s) { for (int i = 0; i < N; i++) a[i] /= s; return a; }           \
  vec& operator+=(const vec& b) { for (int i = 0; i < N; i++) (*this)[i] += b[i]; return *this; } \
  vec& operator*=(T s) { for (int i = 0; i < N; i++) (*this)[i] *= s; return *this; }
template <typename T> struct vec<T, 2> {
  T x, y;
  vec() = default;
  vec(T s) : x(s), y(s) {}
  vec(T a, T b) : x(a), y(b) {}
  MLXLLM_VEC_OPS(2)
};
template <typename T> struct vec<T, 3> {
  T x, y, z;
  vec() = default;
  vec(T s) : x(s), y(s), z(s) {}
  vec(T a, T b, T c) : x(a), y(b), z(c) {}
  vec<T, 2> xy() const { return {x, y}; }
  MLXLLM_VEC_OPS(3)
};
template <typename T> struct vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  vec(T s) : x(s), y(s), z(s), w(s) {}
  vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  vec<T, 2> xy() const { return {x, y}; }
  MLXLLM_VEC_OPS(4)
};
typedef vec<float, 2> float2;
typedef vec<float, 3> float3;
typedef vec<float, 4> float4;
typedef vec<uint, 2> uint2;
typedef vec<uint, 3> uint3;
typedef vec<int, 2> int2;
typedef vec<int, 3> int3;

// --- the emulated machine: fibers, barriers, SIMD-group exchanges ---------------------------------

namespace emu {

constexpr int SIMD_WIDTH = 32;
enum class State { Ready, AtBarrier, AtSimd, Done };
enum class SimdOp { Sum, Max, Min, ShuffleXor, Shuffle, ShuffleDown, ShuffleUp, Broadcast, PrefixExclusiveSum };

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = State::Ready;
  SimdOp op;
  double value = 0, result = 0;
  unsigned arg = 0;
  int simd_seq = 0, barrier_seq = 0;
  uint3 tpig, tpitg, tgpig;
  uint tiitg, lane, sgitg;
};

struct Group {
  std::vector<Thread> threads;
  void (*body)(void*) = nullptr;  // the kernel call every fiber starts in
  void* call = nullptr;
  ucontext_t scheduler;
  int current = -1;
  std::vector<std::vector<char>> shared;  // threadgroup memory, one buffer per declaration
  uint3 tpg, tgpg, tptg;
  uint n_simdgroups;
};

inline thread_local Group* group = nullptr;

inline Thread& self() { return group->threads[group->current]; }

inline void suspend(State why) {
  Thread& t = self();
  t.state = why;
  swapcontext(&t.ctx, &group->scheduler);
}

template <typename T> inline T& tg_shared(int id) {
  auto& buf = group->shared.at(id);
  if (buf.empty()) {
    buf.assign(sizeof(T), 0);
    // Metal leaves threadgroup memory uninitialized: fill with a NaN pattern so a read before a write shows.
    std::fill(buf.begin(), buf.end(), char(0xff));
  }
  return *reinterpret_cast<T*>(buf.data());
}

template <typename T> inline T simd_exchange(SimdOp op, T v, unsigned arg = 0) {
  Thread& t = self();
  t.op = op;
  t.value = double(v);
  t.arg = arg;
  t.simd_seq++;
  suspend(State::AtSimd);
  return T(self().result);
}

// Completes the SIMD-group operation all live lanes of simdgroup `sg` are waiting on.
inline void finish_simd(int first, int count) {
  auto& ts = group->threads;
  Thread& t0 = ts[first];
  for (int i = first; i < first + count; i++) {
    if (ts[i].op != t0.op || ts[i].simd_seq != t0.simd_seq)
      throw std::runtime_error("SIMD-group lanes reached different SIMD operations (divergent control flow)");
  }
  double acc = t0.value;
  for (int i = first + 1; i < first + count; i++) {
    double v = ts[i].value;
    acc = t0.op == SimdOp::Sum ? acc + v : t0.op == SimdOp::Max ? std::max(acc, v) : std::min(acc, v);
  }
  double running = 0;
  for (int i = first; i < first + count; i++) {
    Thread& t = ts[i];
    unsigned lane = unsigned(i - first), src = lane;
    switch (t.op) {
      case SimdOp::Sum: case SimdOp::Max: case SimdOp::Min: t.result = acc; break;
      case SimdOp::PrefixExclusiveSum: t.result = running; running += t.value; break;
      case SimdOp::ShuffleXor: src = lane ^ t.arg; break;
      case SimdOp::Shuffle: case SimdOp::Broadcast: src = t.arg; break;
      case SimdOp::ShuffleDown: src = lane + t.arg; break;
      case SimdOp::ShuffleUp: src = lane >= t.arg ? lane - t.arg : lane; break;
    }
    if (t.op >= SimdOp::ShuffleXor && t.op <= SimdOp::Broadcast)
      t.result = src < unsigned(count) ? ts[first + src].value : t.value;
  }
  for (int i = first; i < first + count; i++) ts[i].state = State::Ready;
}

inline void entry() {
  group->body(group->call);
  self().state = State::Done;
  swapcontext(&self().ctx, &group->scheduler);
}

// Runs every threadgroup of the grid; `threads` is the total thread count per axis (MLX's `grid`).
// `reverse` resumes the fibers of a threadgroup last-to-first: running every kernel in both orders
// exposes reads of threadgroup memory that no barrier orders after the write. `uniform`: every
// threadgroup has the full size (CUDA blocks), else the edge ones are cut to the grid (Metal).
template <typename F> void launch(uint3 threads, uint3 tg_size, int n_shared, bool reverse, F&& kernel,
                                  bool uniform = false) {
  uint3 groups((threads.x + tg_size.x - 1) / tg_size.x, (threads.y + tg_size.y - 1) / tg_size.y,
               (threads.z + tg_size.z - 1) / tg_size.z);
  for (uint gz = 0; gz < groups.z; gz++)
    for (uint gy = 0; gy < groups.y; gy++)
      for (uint gx = 0; gx < groups.x; gx++) {
        Group g;
        group = &g;
        g.shared.resize(n_shared);
        g.tpg = threads;
        g.tgpg = groups;
        uint3 origin(gx * tg_size.x, gy * tg_size.y, gz * tg_size.z);
        // Metal's non-uniform threadgroups: the edge threadgroups are cut to the grid.
        uint3 size = uniform ? tg_size : uint3(std::min(tg_size.x, threads.x - origin.x), std::min(tg_size.y, threads.y - origin.y),
                                               std::min(tg_size.z, threads.z - origin.z));
        g.tptg = size;
        uint n = size.x * size.y * size.z;
        g.n_simdgroups = (n + SIMD_WIDTH - 1) / SIMD_WIDTH;
        g.threads.resize(n);
        struct Call { F* k; };
        Call call{&kernel};
        g.body = [](void* c) { (*static_cast<Call*>(c)->k)(self()); };
        g.call = &call;
        for (uint i = 0; i < n; i++) {
          Thread& t = g.threads[i];
          t.tpitg = uint3(i % size.x, (i / size.x) % size.y, i / (size.x * size.y));
          t.tgpig = uint3(gx, gy, gz);
          t.tpig = uint3(origin.x + t.tpitg.x, origin.y + t.tpitg.y, origin.z + t.tpitg.z);
          t.tiitg = i;
          t.lane = i % SIMD_WIDTH;
          t.sgitg = i / SIMD_WIDTH;
          t.stack.resize(128 * 1024);
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = t.stack.data();
          t.ctx.uc_stack.ss_size = t.stack.size();
          t.ctx.uc_link = nullptr;
          makecontext(&t.ctx, entry, 0);
        }
        while (true) {
          for (uint k = 0; k < n; k++) {
            uint i = reverse ? n - 1 - k : k;
            if (g.threads[i].state == State::Ready) {
              g.current = int(i);
              swapcontext(&g.scheduler, &g.threads[i].ctx);
            }
          }
          bool progressed = false, any_barrier = false, all_done = true;
          for (uint sg = 0; sg < g.n_simdgroups; sg++) {
            int first = int(sg * SIMD_WIDTH), count = int(std::min<uint>(SIMD_WIDTH, n - sg * SIMD_WIDTH));
            int at_simd = 0, done = 0;
            for (int i = first; i < first + count; i++) {
              at_simd += g.threads[i].state == State::AtSimd;
              done += g.threads[i].state == State::Done;
            }
            if (at_simd && at_simd + done == count) {
              if (done) throw std::runtime_error("a SIMD-group operation was reached by only some lanes (others returned)");
              finish_simd(first, count);
              progressed = true;
            }
          }
          if (progressed) continue;
          uint at_barrier = 0, done = 0;
          for (auto& t : g.threads) {
            at_barrier += t.state == State::AtBarrier;
            done += t.state == State::Done;
            all_done &= t.state == State::Done;
            any_barrier |= t.state == State::AtBarrier;
          }
          if (all_done) break;
          if (any_barrier && at_barrier + done == n) {
            if (done) throw std::runtime_error("threadgroup_barrier reached by only some threads (others returned)");
            for (auto& t : g.threads) t.state = State::Ready;
            continue;
          }
          throw std::runtime_error("deadlock: threads wait at different barriers or SIMD operations");
        }
        group = nullptr;
      }
}

}  // namespace emu

