// CUDA twin of ../sdpa_decode_quantized.metal: flash-decoding over a quantized KV cache, pass 1 of 2.
// One warp per (batch, K/V head, split of BLOCK keys) serving all REP query heads x NQ query positions
// of that K/V head, so each K/V row is read and dequantized once for all of them. A lane holds D/32
// features of every query, key and value row; a dot product is a qkv_warp_sum. Writes, per query and
// split, the running max, the softmax normaliser and the unnormalised output (combined by
// sdpa_combine). Template: T, D, BITS, GROUP, REP, NQ, BLOCK, CAUSAL, WINDOW (0: none).
constexpr int EPL = D / 32;
constexpr int NQT = REP * NQ;
constexpr int WPR = D * BITS / 32;
constexpr int GPR = D / GROUP;
int lane = int(threadIdx.x);
int Hkv = kw_shape[1];
int S = kw_shape[2];
int bh = int(blockIdx.y);
int split = int(blockIdx.z);
int nsplit = int(gridDim.z);
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
  const T* qrow = q + ((size_t(b) * Hq + h) * NQ + qi % NQ) * D;
  for (int e = 0; e < EPL; e++) {
    qr[qi][e] = static_cast<float>(qrow[lane * EPL + e]) * sc;
    acc[qi][e] = 0.0f;
  }
  m[qi] = QKV_LOWEST;
  l[qi] = 0.0f;
}
int start = split * BLOCK;
int end = min(start + BLOCK, S);
for (int k = start; k < end; k++) {
  size_t row = size_t(bh) * S + k;
  float kv[EPL];
  float vv[EPL];
  qkv_dequantize_lane<T, BITS, GROUP, EPL>(kw + row * WPR, ks + row * GPR, kb + row * GPR, lane, kv);
  qkv_dequantize_lane<T, BITS, GROUP, EPL>(vw + row * WPR, vs + row * GPR, vb + row * GPR, lane, vv);
  for (int qi = 0; qi < NQT; qi++) {
    int qpos = S - NQ + qi % NQ;
    float partial = 0.0f;
    for (int e = 0; e < EPL; e++) {
      partial += qr[qi][e] * kv[e];
    }
    float s = qkv_warp_sum(partial);
    bool visible = (!CAUSAL || k <= qpos) && (WINDOW == 0 || qpos - k < WINDOW);
    if (visible) {
      float mn = fmaxf(m[qi], s);
      float c = expf(m[qi] - mn);
      float p = expf(s - mn);
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
