// Flash-decoding over a quantized KV cache, pass 1 of 2. One SIMD group (32 lanes) per
// (batch, K/V head, split of BLOCK keys); it serves all REP query heads x NQ query positions of that
// K/V head, so each K/V row is read and dequantized once for all of them. A lane holds D/32 features
// of every query, key and value row; a dot product is a simd_sum. Writes, per query and split, the
// running max, the softmax normaliser and the unnormalised output (combined by sdpa_combine).
// Template: T (activations, scales), D, BITS, GROUP, REP, NQ, BLOCK, CAUSAL, WINDOW (0: none).
constexpr int EPL = D / 32;
constexpr int NQT = REP * NQ;
constexpr int WPR = D * BITS / 32;
constexpr int GPR = D / GROUP;
uint lane = thread_index_in_simdgroup;
int Hkv = kw_shape[1];
int S = kw_shape[2];
int bh = int(threadgroup_position_in_grid.y);
int split = int(threadgroup_position_in_grid.z);
int nsplit = int(threadgroups_per_grid.z);
int b = bh / Hkv;
int kvh = bh % Hkv;
int Hq = Hkv * REP;
float sc = scale[0];
float qr[NQT][EPL];
float m[NQT];
float l[NQT];
float acc[NQT][EPL];
for (int qi = 0; qi < NQT; qi++) {
  int h = kvh * REP + qi / NQ;
  const device T* qrow = q + ((size_t(b) * Hq + h) * NQ + qi % NQ) * D;
  for (int e = 0; e < EPL; e++) {
    qr[qi][e] = float(qrow[lane * EPL + e]) * sc;
    acc[qi][e] = 0.0f;
  }
  m[qi] = metal::numeric_limits<float>::lowest();
  l[qi] = 0.0f;
}
int start = split * BLOCK;
int end = metal::min(start + BLOCK, S);
for (int k = start; k < end; k++) {
  size_t row = size_t(bh) * S + k;
  float kv[EPL];
  float vv[EPL];
  dequantize_lane<T, BITS, GROUP, EPL>(kw + row * WPR, ks + row * GPR, kb + row * GPR, lane, kv);
  dequantize_lane<T, BITS, GROUP, EPL>(vw + row * WPR, vs + row * GPR, vb + row * GPR, lane, vv);
  for (int qi = 0; qi < NQT; qi++) {
    int qpos = S - NQ + qi % NQ;
    float partial = 0.0f;
    for (int e = 0; e < EPL; e++) {
      partial += qr[qi][e] * kv[e];
    }
    float s = simd_sum(partial);
    bool visible = (!CAUSAL || k <= qpos) && (WINDOW == 0 || qpos - k < WINDOW);
    if (visible) {
      float mn = metal::max(m[qi], s);
      float c = metal::exp(m[qi] - mn);
      float p = metal::exp(s - mn);
      l[qi] = l[qi] * c + p;
      for (int e = 0; e < EPL; e++) {
        acc[qi][e] = acc[qi][e] * c + p * vv[e];
      }
      m[qi] = mn;
    }
  }
}
for (int qi = 0; qi < NQT; qi++) {
  int h = kvh * REP + qi / NQ;
  size_t idx = ((size_t(b) * Hq + h) * NQ + qi % NQ) * nsplit + split;
  if (lane == 0) {
    part_m[idx] = m[qi];
    part_l[idx] = l[qi];
  }
  for (int e = 0; e < EPL; e++) {
    part_o[idx * D + lane * EPL + e] = acc[qi][e];
  }
}
