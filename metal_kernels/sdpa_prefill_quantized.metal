// Prefill / chunked-prefill attention over a quantized KV cache with an online softmax: one
// threadgroup of TQ threads per (tile of TQ query positions, batch x query head); thread t owns query
// row t. Key blocks of BK rows are dequantized once into threadgroup memory by all threads together,
// then every thread scores its query against the block and folds it into its running max, normaliser
// and output. Working memory is the two staged blocks (2 x BK x D floats), never an L x S matrix.
// Also writes each row's log-sum-exp; a row that saw no key gets output 0 and lse lowest.
// Template: T, D, BITS, GROUP, REP (query heads per K/V head), TQ, BK, CAUSAL, WINDOW (0: none).
constexpr int WPR = D * BITS / 32;
constexpr int GPR = D / GROUP;
threadgroup float k_tile[BK][D];
threadgroup float v_tile[BK][D];
int t = int(thread_position_in_threadgroup.x);
int L = q_shape[2];
int Hq = q_shape[1];
int Hkv = kw_shape[1];
int S = kw_shape[2];
int bh = int(threadgroup_position_in_grid.y);
int b = bh / Hq;
int kvh = (bh % Hq) / REP;
int row0 = int(threadgroup_position_in_grid.x) * TQ;
int qi = row0 + t;
bool live = qi < L;
int qpos = S - L + qi;
float sc = scale[0];
float qr[D];
float acc[D];
const device T* qrow = q + (size_t(bh) * L + (live ? qi : 0)) * D;
for (int j = 0; j < D; j++) {
  qr[j] = float(qrow[j]) * sc;
  acc[j] = 0.0f;
}
float m = metal::numeric_limits<float>::lowest();
float l = 0.0f;
// Keys any query of this tile may see: [first, last], the same bounds for every thread (barriers).
int last_q = S - L + metal::min(row0 + TQ, L) - 1;
int first_q = S - L + row0;
int first = WINDOW > 0 ? metal::max(0, first_q - WINDOW + 1) : 0;
int last = CAUSAL ? last_q : S - 1;
size_t kv0 = size_t(b) * Hkv + kvh;
for (int start = first / BK * BK; start <= last; start += BK) {
  int n = metal::min(BK, S - start);
  for (int idx = t; idx < BK * D; idx += TQ) {
    int r = idx / D;
    int j = idx % D;
    if (r < n) {
      size_t row = kv0 * S + start + r;
      k_tile[r][j] = dequantize_one<T, BITS, GROUP>(kw + row * WPR, ks + row * GPR, kb + row * GPR, j);
      v_tile[r][j] = dequantize_one<T, BITS, GROUP>(vw + row * WPR, vs + row * GPR, vb + row * GPR, j);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int r = 0; r < n; r++) {
    int k = start + r;
    bool visible = live && (!CAUSAL || k <= qpos) && (WINDOW == 0 || qpos - k < WINDOW);
    if (visible) {
      float s = 0.0f;
      for (int j = 0; j < D; j++) {
        s += qr[j] * k_tile[r][j];
      }
      float mn = metal::max(m, s);
      float c = metal::exp(m - mn);
      float p = metal::exp(s - mn);
      l = l * c + p;
      for (int j = 0; j < D; j++) {
        acc[j] = acc[j] * c + p * v_tile[r][j];
      }
      m = mn;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
if (live) {
  device T* orow = out + (size_t(bh) * L + qi) * D;
  for (int j = 0; j < D; j++) {
    orow[j] = T(l > 0.0f ? acc[j] / l : 0.0f);
  }
  lse[size_t(bh) * L + qi] = l > 0.0f ? m + metal::log(l) : metal::numeric_limits<float>::lowest();
}
