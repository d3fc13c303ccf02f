// Flash-decoding pass 2: one threadgroup of D threads per query row combines the NSPLIT partial
// results: thread 0 finds the overall max and normaliser, shares them through threadgroup memory and
// writes the row's log-sum-exp, which lets attention over other keys be merged in; every thread then
// rescales and sums its feature over the splits. A row that saw no key gets output 0 and lse lowest.
threadgroup float shared[2];
uint d = thread_position_in_threadgroup.x;
size_t row = threadgroup_position_in_grid.y;
int nsplit = part_m_shape[part_m_ndim - 1];
if (d == 0) {
  float M = metal::numeric_limits<float>::lowest();
  for (int s = 0; s < nsplit; s++) {
    M = metal::max(M, part_m[row * nsplit + s]);
  }
  float den = 0.0f;
  for (int s = 0; s < nsplit; s++) {
    den += metal::exp(part_m[row * nsplit + s] - M) * part_l[row * nsplit + s];
  }
  shared[0] = M;
  shared[1] = den;
  lse[row] = den > 0.0f ? M + metal::log(den) : metal::numeric_limits<float>::lowest();
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float M = shared[0];
float num = 0.0f;
for (int s = 0; s < nsplit; s++) {
  num += metal::exp(part_m[row * nsplit + s] - M) * part_o[(row * nsplit + s) * D + d];
}
out[row * D + d] = T(shared[1] > 0.0f ? num / shared[1] : 0.0f);
