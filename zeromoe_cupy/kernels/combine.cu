// The layer's last pass (SPEC.md steps 8-9): per token, the weighted sum of its real experts'
// output rows plus the zero experts' share (identity / zero / constant), accumulated in fp32
// and written once in x's dtype. With no expert rows it is the zero experts' share alone.
#include "common.cuh"

#define ZERO_IDENTITY 0
#define ZERO_ZERO 1
#define ZERO_CONSTANT 2
#define MAX_SLOTS 64

// One block per token; threads stride over H in VEC-element steps.
// x: (T, H) row stride x_stride; ids, weights: (T, K); rows: (M, H) or null;
// slot_rows: (T, K) row of rows for each real slot (-1 otherwise) or null;
// zero_types: (Z,) int32 codes; const_vec: (Z, H); const_gate: (Z, 2, H); out: (T, H).
template <typename T, int VEC>
__global__ void combine_kernel(const T* __restrict__ x, long long x_stride,
                               const int* __restrict__ ids, const float* __restrict__ weights,
                               const T* __restrict__ rows, const int* __restrict__ slot_rows,
                               const int* __restrict__ zero_types,
                               const T* __restrict__ const_vec, const T* __restrict__ const_gate,
                               T* __restrict__ out, int H, int K, int E, int Z) {
  __shared__ float x_coef;                 // sum of identity weights + constant a1 * w
  __shared__ float row_w[MAX_SLOTS];       // weight per real slot
  __shared__ long long row_off[MAX_SLOTS]; // element offset of the slot's expert row
  __shared__ float cvec_w[MAX_SLOTS];      // weight * a2 per constant slot
  __shared__ int cvec_j[MAX_SLOTS];
  __shared__ int n_rows, n_cvec, use_x;  // use_x: an identity or constant slot reads x
  __shared__ float scratch[32];

  __shared__ int slot_kind[MAX_SLOTS];     // -1 none, 0..2 zero type, 3 real
  __shared__ int slot_aux[MAX_SLOTS];      // real: row of rows; constant: zero-expert index
  __shared__ float slot_w[MAX_SLOTS];

  const long long t = blockIdx.x;
  const T* xt = x + t * x_stride;
  // Each slot is read by its own thread (the loads overlap), then thread 0 compacts them in
  // slot order, so the fp32 sums below always run in the same order.
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int e = ids[t * K + k];
    int kind = -1, aux = 0;
    if (e >= 0 && e < E) {
      if (rows != nullptr) { aux = slot_rows[t * K + k]; kind = aux >= 0 ? 3 : -1; }
    } else if (e >= E && e < E + Z) {  // ids outside [0, E+Z) contribute nothing
      kind = zero_types[e - E];
      aux = e - E;
    }
    slot_kind[k] = kind;
    slot_aux[k] = aux;
    slot_w[k] = weights[t * K + k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float xc = 0.f;
    int nr = 0, nc = 0, ux = 0;
    for (int k = 0; k < K; ++k) {
      const int kind = slot_kind[k];
      const float w = slot_w[k];
      if (kind == 3) { row_w[nr] = w; row_off[nr] = (long long)slot_aux[k] * H; ++nr; }
      else if (kind == ZERO_IDENTITY) { xc += w; ux = 1; }
      else if (kind == ZERO_CONSTANT) { cvec_w[nc] = w; cvec_j[nc] = slot_aux[k]; ++nc; ux = 1; }
    }
    x_coef = xc; n_rows = nr; n_cvec = nc; use_x = ux;
  }
  __syncthreads();

  // Constant experts: [a1, a2] = softmax(const_gate[j] @ x); x gets w*a1, const_vec gets w*a2.
  for (int c = 0; c < n_cvec; ++c) {
    const T* g = const_gate + (long long)cvec_j[c] * 2 * H;
    float d0 = 0.f, d1 = 0.f;
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
      const float xv = to_f32(xt[h]);
      d0 += to_f32(g[h]) * xv;
      d1 += to_f32(g[H + h]) * xv;
    }
    d0 = block_sum(d0, scratch);
    d1 = block_sum(d1, scratch);
    if (threadIdx.x == 0) {
      const float m = fmaxf(d0, d1);
      const float e0 = __expf(d0 - m), e1 = __expf(d1 - m);
      const float a1 = e0 / (e0 + e1), a2 = e1 / (e0 + e1);
      x_coef += cvec_w[c] * a1;
      cvec_w[c] *= a2;
    }
  }
  __syncthreads();

  const float xc = x_coef;
  const int nr = n_rows, nc = n_cvec, ux = use_x;
  T* ot = out + t * (long long)H;
  for (int h = threadIdx.x * VEC; h < H; h += blockDim.x * VEC) {
    float acc[VEC], v[VEC];
    if (ux) {
      load_f32<T, VEC>(xt + h, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = xc * v[i];
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    }
    for (int r = 0; r < nr; ++r) {
      load_f32<T, VEC>(rows + row_off[r] + h, v);
      const float w = row_w[r];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += w * v[i];
    }
    for (int c = 0; c < nc; ++c) {
      load_f32<T, VEC>(const_vec + (long long)cvec_j[c] * H + h, v);
      const float w = cvec_w[c];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += w * v[i];
    }
    store_f32<T, VEC>(ot + h, acc);
  }
}
