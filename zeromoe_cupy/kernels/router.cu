// Router logits by matrix-vector products: logits[t, n] = sum_h fp32(x[t, h]) * W[n, h]
// (+ bias[n]). RG_SPLIT warps share expert n's row (RG_ROWS rows per block), reading it once
// for a block of up to MAXT tokens (blockIdx.y picks the block). Thread i = 32 q + lane of the
// row's warps takes the 4-element chunks h = 4 i .. 4 i + 3, then + 4 * 32 * RG_SPLIT, ...,
// whatever VEC is; fp32 FMAs, a warp tree sum, then the RG_SPLIT warp sums added in warp
// order. So each logit's sum runs in one order whatever T, the token block or the alignment:
// the same bits for a token alone or in any batch. One launch, no fp32 copy of x.
// Several warps per row: one warp streaming a 24 KB row alone left a one-token call waiting on
// memory latency (18.9 MB of LongCat-Flash weights in 20-27 us). Eight warps of one row per
// block, one chunk at a time (fewer registers, more warps per SM), against four warps of two
// rows, four chunks ahead (H200, weights not in L2, us per call at 1 / 4 / 8 / 16 / 32
// tokens, one run): 12.5 / 13.3 / 15.3 / 22.2 / 41.8 against 11.1 / 16.9 / 24.0 / 41.6 / 73.0
// (benchmarks/router_variants.py). One choice for every T: the split sets each logit's
// summation order (RG_UNROLL does not).
#include "common.cuh"

// (-D options may set them: benchmarks/router_variants.py; routing.py launches the defaults)
#ifndef RG_SPLIT
#define RG_SPLIT 8  // warps per row
#endif
#ifndef RG_ROWS
#define RG_ROWS 1   // rows per block: blockDim.x = 32 * RG_SPLIT * RG_ROWS
#endif
#ifndef RG_UNROLL
#define RG_UNROLL 1  // chunks whose weights a thread loads before it uses any
#endif

template <typename T, int VEC, int MAXT>
__global__ void router_gemv(const T* __restrict__ x, long long x_stride, int tokens,
                            const float* __restrict__ W, int H, int N,
                            const float* __restrict__ bias, float* __restrict__ out) {
  wait_for_prior_grid();
  constexpr int CH = 4, STEP = 32 * RG_SPLIT * CH;
  static_assert(CH % VEC == 0, "VEC must divide the chunk");
  __shared__ float partial[RG_ROWS][RG_SPLIT][MAXT];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp / RG_SPLIT, q = warp % RG_SPLIT;
  const int n = blockIdx.x * RG_ROWS + row;
  const long long t0 = (long long)blockIdx.y * MAXT;
  const int count = min((long long)MAXT, tokens - t0);
  x += t0 * x_stride;
  float acc[MAXT] = {};
  if (n < N) {  // no early return: the block meets at the barrier below
    const float* w = W + (long long)n * H;
    // UNROLL chunks' weights are loaded before any is used: more loads in flight per thread.
    // The FMAs run in the same order as chunk by chunk.
    constexpr int UNROLL = RG_UNROLL;
    for (int c0 = (q * 32 + lane) * CH; c0 < H; c0 += STEP * UNROLL) {
      float wv[UNROLL][CH];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int c = c0 + u * STEP;
#pragma unroll
        for (int v = 0; v < CH; v += VEC) {
          if (c + v >= H) break;
          float tmp[VEC];
          load_f32<float, VEC>(w + c + v, tmp);
#pragma unroll
          for (int i = 0; i < VEC; ++i) wv[u][v + i] = tmp[i];
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int c = c0 + u * STEP;
#pragma unroll
        for (int v = 0; v < CH; v += VEC) {
          if (c + v >= H) break;
#pragma unroll
          for (int t = 0; t < MAXT; ++t) {
            if (t < count) {
              float xv[VEC];
              load_f32<T, VEC>(x + t * x_stride + c + v, xv);
#pragma unroll
              for (int i = 0; i < VEC; ++i) acc[t] = fmaf(wv[u][v + i], xv[i], acc[t]);
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
    const float v = warp_sum(acc[t]);
    if (lane == 0) partial[row][q][t] = v;
  }
  __syncthreads();
  if (n < N && q == 0 && lane < count) {
    float v = partial[row][0][lane];
#pragma unroll
    for (int s = 1; s < RG_SPLIT; ++s) v += partial[row][s][lane];
    out[(t0 + lane) * N + n] = bias != nullptr ? v + bias[n] : v;
  }
}
