// The layer's last pass (docs/spec.md steps 8-9): per token, the weighted sum of its real experts'
// output rows plus the zero experts' share (identity / zero / constant), accumulated in fp32
// and written once in x's dtype. With no expert rows it is the zero experts' share alone.
#include "common.cuh"

#define ZERO_IDENTITY 0
#define ZERO_ZERO 1
#define ZERO_CONSTANT 2
#define SLOT_REAL 3
#define MAX_SLOTS 64
#define COMBINE_WARPS 8  // tokens per block: one warp each, so many tokens are in flight

// One warp per (token, slice of H): blockIdx.y picks features [y * slice, (y + 1) * slice),
// slice a multiple of 32 * VEC; its lanes stride over them in VEC-element steps. Slicing H
// gives a few tokens enough warps (one warp per token left a one-token combine waiting on
// 24 x 8 dependent loads); each element's sum is the same whatever the slice.
// x: (T, H) row stride x_stride; ids, weights: (T, K); rows: (M, H) or null;
// slot_rows: (T, K) row of rows for each real slot (-1 otherwise) or null;
// zero_types: (Z,) int32 codes; const_vec: (Z, H); const_gate: (Z, 2, H); out: (T, H).
// R, the rows' type: T, or float (an fp16 layer's expert outputs, which may pass 65504).
template <typename T, typename R, int VEC>
__global__ void combine_kernel(const T* __restrict__ x, long long x_stride,
                               const int* __restrict__ ids, const float* __restrict__ weights,
                               const R* __restrict__ rows, const int* __restrict__ slot_rows,
                               const int* __restrict__ zero_types,
                               const T* __restrict__ const_vec, const T* __restrict__ const_gate,
                               T* __restrict__ out, long long T_, int H, int K, int E, int Z, int slice) {
  wait_for_prior_grid();
  // Per warp: the token's slots, classified, then compacted in slot order (so the fp32 sums
  // run in the same order every time).
  __shared__ int slot_kind[COMBINE_WARPS][MAX_SLOTS];  // -1 nothing, zero type, or SLOT_REAL
  __shared__ int slot_aux[COMBINE_WARPS][MAX_SLOTS];   // real: row of rows; constant: index
  __shared__ float slot_w[COMBINE_WARPS][MAX_SLOTS];
  __shared__ float row_w[COMBINE_WARPS][MAX_SLOTS];
  __shared__ long long row_off[COMBINE_WARPS][MAX_SLOTS];
  __shared__ float cvec_w[COMBINE_WARPS][MAX_SLOTS];   // w * a2 per constant slot
  __shared__ int cvec_j[COMBINE_WARPS][MAX_SLOTS];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long t = (long long)blockIdx.x * COMBINE_WARPS + warp;
  if (t >= T_) return;  // no block-wide barriers below: whole warps may leave
  const T* xt = x + t * x_stride;

  for (int k = lane; k < K; k += 32) {
    const int e = ids[t * K + k];
    int kind = -1, aux = 0;
    if (e >= 0 && e < E) {
      if (rows != nullptr) { aux = slot_rows[t * K + k]; kind = aux >= 0 ? SLOT_REAL : -1; }
    } else if (e >= E && e < E + Z) {  // ids outside [0, E+Z) contribute nothing
      kind = zero_types[e - E];
      aux = e - E;
    }
    slot_kind[warp][k] = kind;
    slot_aux[warp][k] = aux;
    slot_w[warp][k] = weights[t * K + k];
  }
  __syncwarp();
  // Every lane compacts the same way (cheap: K shared reads), so no broadcast is needed.
  float xc = 0.f;
  int nr = 0, nc = 0, use_x = 0;
  for (int k = 0; k < K; ++k) {
    const int kind = slot_kind[warp][k];
    const float w = slot_w[warp][k];
    if (kind == SLOT_REAL) {
      if (lane == 0) { row_w[warp][nr] = w; row_off[warp][nr] = (long long)slot_aux[warp][k] * H; }
      ++nr;
    } else if (kind == ZERO_IDENTITY) {
      xc += w; use_x = 1;
    } else if (kind == ZERO_CONSTANT) {
      // [a1, a2] = softmax(const_gate[j] @ x): x gets w * a1, const_vec[j] gets w * a2.
      const int j = slot_aux[warp][k];
      const T* g = const_gate + (long long)j * 2 * H;
      float d0 = 0.f, d1 = 0.f;
      for (int h = lane; h < H; h += 32) {
        const float xv = to_f32(xt[h]);
        d0 += to_f32(g[h]) * xv;
        d1 += to_f32(g[H + h]) * xv;
      }
      d0 = warp_sum(d0);
      d1 = warp_sum(d1);
      const float m = fmaxf(d0, d1);
      const float e0 = __expf(d0 - m), e1 = __expf(d1 - m);
      xc += w * (e0 / (e0 + e1));
      if (lane == 0) { cvec_w[warp][nc] = w * (e1 / (e0 + e1)); cvec_j[warp][nc] = j; }
      ++nc; use_x = 1;
    }
  }
  __syncwarp();

  T* ot = out + t * (long long)H;
  const int h_end = min(H, (int)(blockIdx.y + 1) * slice);
  for (int h = blockIdx.y * slice + lane * VEC; h < h_end; h += 32 * VEC) {
    float acc[VEC], v[VEC];
    if (use_x) {
      load_f32<T, VEC>(xt + h, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = xc * v[i];
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    }
    // ROWS_AHEAD rows' loads in flight before their sums, which keep the slot order.
    constexpr int ROWS_AHEAD = 4;
    int r = 0;
    for (; r + ROWS_AHEAD <= nr; r += ROWS_AHEAD) {
      float vs[ROWS_AHEAD][VEC];
#pragma unroll
      for (int j = 0; j < ROWS_AHEAD; ++j)
        load_f32<R, VEC>(rows + row_off[warp][r + j] + h, vs[j]);
#pragma unroll
      for (int j = 0; j < ROWS_AHEAD; ++j) {
        const float w = row_w[warp][r + j];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += w * vs[j][i];
      }
    }
    for (; r < nr; ++r) {
      load_f32<R, VEC>(rows + row_off[warp][r] + h, v);
      const float w = row_w[warp][r];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += w * v[i];
    }
    for (int c = 0; c < nc; ++c) {
      load_f32<T, VEC>(const_vec + (long long)cvec_j[warp][c] * H + h, v);
      const float w = cvec_w[warp][c];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += w * v[i];
    }
    store_f32<T, VEC>(ot + h, acc);
  }
}

// s * x rounded to T, for expert_input_scale: x (T_, H) with row stride x_stride -> out
// (T_, H) contiguous. One element a thread (an elementwise pass, run only when s != 1).
template <typename T>
__global__ void scale_rows_kernel(const T* __restrict__ x, long long x_stride,
                                  T* __restrict__ out, long long n, int H, float s) {
  wait_for_prior_grid();
  const long long step = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    const long long t = i / H;
    out[i] = from_f32<T>(to_f32(x[t * x_stride + (i - t * H)]) * s);
  }
}
