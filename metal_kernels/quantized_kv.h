// Shared by the quantized-KV attention kernels: this lane's EPL features of one cached row,
// dequantized in registers from MLX's affine layout (BITS-bit values packed little-end first into
// uint32 words, one scale and bias per GROUP features). BITS must divide 32 (2, 4 or 8).
template <typename T, int BITS, int GROUP, int EPL>
inline void dequantize_lane(const device uint32_t* words, const device T* scales, const device T* biases,
                                uint lane, thread float* out) {
  constexpr int PER_WORD = 32 / BITS;
  constexpr uint MASK = (1u << BITS) - 1u;
  for (int e = 0; e < EPL; e++) {
    int j = int(lane) * EPL + e;
    uint q = (words[j / PER_WORD] >> ((j % PER_WORD) * BITS)) & MASK;
    out[e] = float(scales[j / GROUP]) * float(q) + float(biases[j / GROUP]);
  }
}

// Feature j of one cached row, dequantized (used when a threadgroup stages a block of rows).
template <typename T, int BITS, int GROUP>
inline float dequantize_one(const device uint32_t* words, const device T* scales, const device T* biases, int j) {
  constexpr int PER_WORD = 32 / BITS;
  constexpr uint MASK = (1u << BITS) - 1u;
  uint q = (words[j / PER_WORD] >> ((j % PER_WORD) * BITS)) & MASK;
  return float(scales[j / GROUP]) * float(q) + float(biases[j / GROUP]);
}
