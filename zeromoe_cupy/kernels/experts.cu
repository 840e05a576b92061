// The real experts' data movement: per-expert offsets, the gather of (token, slot) rows into
// expert order, and SiLU(gate) * up between the two grouped GEMMs.
#include "common.cuh"

// counts: (E,) pairs per real expert -> offsets: (E+1,) exclusive scan; cursor: (E,) zeroed.
// One block; E may exceed blockDim (each thread scans a contiguous chunk).
extern "C" __global__ void expert_offsets(const int* __restrict__ counts, int E,
                                          int* __restrict__ offsets, int* __restrict__ cursor) {
  __shared__ int partial[1024];
  const int chunk = (E + blockDim.x - 1) / blockDim.x;
  const int begin = min(E, (int)threadIdx.x * chunk), end = min(E, begin + chunk);
  int sum = 0;
  for (int e = begin; e < end; ++e) sum += counts[e];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int off = 1; off < blockDim.x; off <<= 1) {  // Hillis-Steele inclusive scan
    const int v = threadIdx.x >= off ? partial[threadIdx.x - off] : 0;
    __syncthreads();
    partial[threadIdx.x] += v;
    __syncthreads();
  }
  int run = partial[threadIdx.x] - sum;
  for (int e = begin; e < end; ++e) {
    offsets[e] = run;
    cursor[e] = 0;
    run += counts[e];
  }
  if (threadIdx.x == blockDim.x - 1) offsets[E] = partial[threadIdx.x];
}

// One block per (token, slot): a real slot claims the next row of its expert's block and
// copies x's row there. slot_rows gets that row (-1 for zero-expert slots).
template <typename T, int VEC>
__global__ void gather_rows(const T* __restrict__ x, long long x_stride,
                            const int* __restrict__ ids, int K, int E,
                            const int* __restrict__ offsets, int* __restrict__ cursor,
                            int* __restrict__ slot_rows, T* __restrict__ xs, int H) {
  __shared__ int row;
  const long long pair = blockIdx.x;
  if (threadIdx.x == 0) {
    const int e = ids[pair];
    row = (e >= 0 && e < E) ? offsets[e] + atomicAdd(&cursor[e], 1) : -1;
    slot_rows[pair] = row;
  }
  __syncthreads();
  if (row < 0) return;
  const T* src = x + (pair / K) * x_stride;
  T* dst = xs + (long long)row * H;
  for (int h = threadIdx.x * VEC; h < H; h += blockDim.x * VEC) {
    *reinterpret_cast<Vec<T, VEC>*>(dst + h) = *reinterpret_cast<const Vec<T, VEC>*>(src + h);
  }
}

// gate_up: (M, 2I) with gate columns first -> h: (M, I) = silu(gate) * up, computed in fp32.
template <typename T, int VEC>
__global__ void silu_mul(const T* __restrict__ gate_up, T* __restrict__ h, long long M, int I) {
  const long long per_row = I / VEC;
  const long long n = M * per_row;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / per_row, c = (i % per_row) * VEC;
    float g[VEC], u[VEC], o[VEC];
    load_f32<T, VEC>(gate_up + r * 2 * I + c, g);
    load_f32<T, VEC>(gate_up + r * 2 * I + I + c, u);
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = g[j] / (1.f + __expf(-g[j])) * u[j];
    store_f32<T, VEC>(h + r * I + c, o);
  }
}
