// CUDA twin of ../sdpa_combine.metal: flash-decoding pass 2. One block of D threads per query row
// combines the NSPLIT partial results: thread 0 finds the overall max and normaliser, shares them
// through shared memory and writes the row's log-sum-exp; every thread then rescales and sums its
// feature over the splits. A row that saw no key gets output 0 and lse QKV_LOWEST.
__shared__ float shared[2];
int d = int(threadIdx.x);
size_t row = blockIdx.y;
int nsplit = part_m_shape[part_m_ndim - 1];
if (d == 0) {
  float M = QKV_LOWEST;
  for (int s = 0; s < nsplit; s++) {
    M = fmaxf(M, part_m[row * nsplit + s]);
  }
  float den = 0.0f;
  for (int s = 0; s < nsplit; s++) {
    den += expf(part_m[row * nsplit + s] - M) * part_l[row * nsplit + s];
  }
  shared[0] = M;
  shared[1] = den;
  lse[row] = den > 0.0f ? M + logf(den) : QKV_LOWEST;
}
__syncthreads();
float M = shared[0];
float num = 0.0f;
for (int s = 0; s < nsplit; s++) {
  num += expf(part_m[row * nsplit + s] - M) * part_o[(row * nsplit + s) * D + d];
}
out[row * D + d] = T(shared[1] > 0.0f ? num / shared[1] : 0.0f);
