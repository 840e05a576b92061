// Router logits for a few tokens: logits[t, n] = sum_h fp32(x[t, h]) * W[n, h] (+ bias[n]).
// One warp per expert n reads W's row once for all tokens (T <= MAXT); lanes stride over h in
// VEC-element steps; fp32 FMAs, then a warp tree sum. One launch, no fp32 copy of x.
#include "common.cuh"

template <typename T, int VEC, int MAXT>
__global__ void router_gemv(const T* __restrict__ x, long long x_stride, int tokens,
                            const float* __restrict__ W, int H, int N,
                            const float* __restrict__ bias, float* __restrict__ out) {
  const int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (n >= N) return;  // whole warps leave together
  const float* w = W + (long long)n * H;
  float acc[MAXT] = {};
  for (int h = lane * VEC; h < H; h += 32 * VEC) {
    float wv[VEC];
    load_f32<float, VEC>(w + h, wv);
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      if (t < tokens) {
        float xv[VEC];
        load_f32<T, VEC>(x + t * x_stride + h, xv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[t] = fmaf(wv[i], xv[i], acc[t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
    const float v = warp_sum(acc[t]);
    if (lane == 0 && t < tokens) out[(long long)t * N + n] = bias != nullptr ? v + bias[n] : v;
  }
}
