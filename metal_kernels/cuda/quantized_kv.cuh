// The CUDA twins' shared helpers (see ../quantized_kv.h for the Metal originals): dequantizing cached
// rows from MLX's affine layout (BITS-bit values packed little-end first into uint32 words, one scale
// and bias per GROUP features; BITS divides 32) and a warp-wide sum. Prefixed qkv_ so that no name of
// the MLX header the kernels are compiled with (mlx::core::cu) can shadow them.
constexpr float QKV_LOWEST = -3.402823466e38f;  // what a row that saw no key reports as its max / lse

// This lane's EPL features of one cached row, dequantized in registers.
template <typename T, int BITS, int GROUP, int EPL>
__device__ inline void qkv_dequantize_lane(const uint32_t* words, const T* scales, const T* biases, int lane,
                                       float* out) {
  constexpr int PER_WORD = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  for (int e = 0; e < EPL; e++) {
    int j = lane * EPL + e;
    uint32_t q = (words[j / PER_WORD] >> ((j % PER_WORD) * BITS)) & MASK;
    out[e] = static_cast<float>(scales[j / GROUP]) * float(q) + static_cast<float>(biases[j / GROUP]);
  }
}

// Feature j of one cached row, dequantized (used when a block stages rows in shared memory).
template <typename T, int BITS, int GROUP>
__device__ inline float qkv_dequantize_one(const uint32_t* words, const T* scales, const T* biases, int j) {
  constexpr int PER_WORD = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  uint32_t q = (words[j / PER_WORD] >> ((j % PER_WORD) * BITS)) & MASK;
  return static_cast<float>(scales[j / GROUP]) * float(q) + static_cast<float>(biases[j / GROUP]);
}

// Sum over the 32 lanes of a warp; every lane gets the same value (the butterfly adds the same pairs).
__device__ inline float qkv_warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}
