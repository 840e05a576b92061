// Router logits by matrix-vector products: logits[t, n] = sum_h fp32(x[t, h]) * W[n, h]
// (+ bias[n]). One warp per expert n reads W's row once for a block of up to MAXT tokens
// (blockIdx.y picks the block); lanes take 4-element chunks of h in a fixed order (lane l:
// h = 4l .. 4l+3, then + 128, ...), whatever VEC is; fp32 FMAs, then a warp tree sum. So each
// logit's sum runs in one order whatever T, the token block or the alignment: the same bits
// for a token alone or in any batch. One launch, no fp32 copy of x.
#include "common.cuh"

template <typename T, int VEC, int MAXT>
__global__ void router_gemv(const T* __restrict__ x, long long x_stride, int tokens,
                            const float* __restrict__ W, int H, int N,
                            const float* __restrict__ bias, float* __restrict__ out) {
  constexpr int CH = 4;
  static_assert(CH % VEC == 0, "VEC must divide the chunk");
  const int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (n >= N) return;  // whole warps leave together
  const long long t0 = (long long)blockIdx.y * MAXT;
  const int count = min((long long)MAXT, tokens - t0);
  x += t0 * x_stride;
  const float* w = W + (long long)n * H;
  float acc[MAXT] = {};
  for (int c = lane * CH; c < H; c += 32 * CH) {
#pragma unroll
    for (int v = 0; v < CH; v += VEC) {
      if (VEC == 1 && c + v >= H) break;
      float wv[VEC];
      load_f32<float, VEC>(w + c + v, wv);
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        if (t < count) {
          float xv[VEC];
          load_f32<T, VEC>(x + t * x_stride + c + v, xv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[t] = fmaf(wv[i], xv[i], acc[t]);
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
    const float v = warp_sum(acc[t]);
    if (lane == 0 && t < count) out[(t0 + t) * N + n] = bias != nullptr ? v + bias[n] : v;
  }
}
