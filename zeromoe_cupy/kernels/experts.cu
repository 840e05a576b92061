// The real experts' data movement: per-expert offsets, the gather of (token, slot) rows into
// expert order, and SiLU(gate) * up between the two grouped GEMMs.
#include "common.cuh"

// counts: (E,) pairs per real expert -> offsets: (E+1,) exclusive scan of the counts, each
// rounded up to a multiple of `pad` (1: no padding) so padded batched GEMMs see whole tiles;
// cursor: (E,) zeroed. One block; E may exceed blockDim (each thread scans a contiguous chunk).
__device__ __forceinline__ int padded_count(int c, int pad) { return (c + pad - 1) / pad * pad; }

extern "C" __global__ void expert_offsets(const int* __restrict__ counts, int E, int pad,
                                          int* __restrict__ offsets, int* __restrict__ cursor) {
  wait_for_prior_grid();
  __shared__ int partial[1024];
  const int chunk = (E + blockDim.x - 1) / blockDim.x;
  const int begin = min(E, (int)threadIdx.x * chunk), end = min(E, begin + chunk);
  int sum = 0;
  for (int e = begin; e < end; ++e) sum += padded_count(counts[e], pad);
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
    run += padded_count(counts[e], pad);
  }
  if (threadIdx.x == blockDim.x - 1) offsets[E] = partial[threadIdx.x];
}

// One block per (token, slot): a real slot claims the next row of its expert's block and
// copies x's row there. slot_rows gets that row (-1 for zero-expert slots). With capacity > 0
// a block holds at most that many rows: a slot that finds its expert's block full gets no row
// and spill[pair] = its expert (spill[pair] = -1 for every other slot), for another path.
template <typename T, int VEC>
__global__ void gather_rows(const T* __restrict__ x, long long x_stride,
                            const int* __restrict__ ids, int K, int E,
                            const int* __restrict__ offsets, int* __restrict__ cursor,
                            int* __restrict__ slot_rows, T* __restrict__ xs, int H,
                            int capacity, int* __restrict__ spill) {
  wait_for_prior_grid();
  __shared__ int row;
  const long long pair = blockIdx.x;
  if (threadIdx.x == 0) {
    const int e = ids[pair];
    const int claim = (e >= 0 && e < E) ? atomicAdd(&cursor[e], 1) : -1;
    const bool fits = claim >= 0 && (capacity == 0 || claim < capacity);
    row = fits ? offsets[e] + claim : -1;
    slot_rows[pair] = row;
    if (capacity > 0) spill[pair] = claim >= 0 && !fits ? e : -1;
  }
  __syncthreads();
  if (row < 0 || xs == nullptr) return;  // xs null: the rows only (slot_rows), no copy
  const T* src = x + (pair / K) * x_stride;
  T* dst = xs + (long long)row * H;
  for (int h = threadIdx.x * VEC; h < H; h += blockDim.x * VEC) {
    *reinterpret_cast<Vec<T, VEC>*>(dst + h) = *reinterpret_cast<const Vec<T, VEC>*>(src + h);
  }
}

// The "capacity" path's batched-GEMM pointers, (6, E) uint64: for GEMM 1 (w13, x rows, gate_up
// rows) and GEMM 2 (w2, h rows, output rows) of each batch entry. The first active[0] entries
// serve the active experts (active: syncfree_plan's list), each with its block of C rows; the
// other entries all read expert 0's weights (one expert's bytes, mostly L2 hits, where each
// inactive expert's own would cost a full read) and the scratch block E of the row buffers,
// and write scratch (rows_scratch for GEMM 2). One thread per entry.
extern "C" __global__ void capacity_pointers(
    const int* __restrict__ active, int E, int C, unsigned long long w13,
    unsigned long long w13_bytes, unsigned long long xs, unsigned long long xs_row,
    unsigned long long gate_up, unsigned long long gate_up_row, unsigned long long w2,
    unsigned long long w2_bytes, unsigned long long h, unsigned long long h_row,
    unsigned long long rows, unsigned long long rows_row, unsigned long long rows_scratch,
    unsigned long long* __restrict__ ptrs) {
  wait_for_prior_grid();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= E) return;
  const bool real = i < active[0];
  const unsigned long long e = real ? active[1 + i] : 0;  // weights
  const unsigned long long b = (real ? e : E) * C;        // first row of the block
  ptrs[i] = w13 + e * w13_bytes;
  ptrs[E + i] = xs + b * xs_row;
  ptrs[2 * E + i] = gate_up + b * gate_up_row;
  ptrs[3 * E + i] = w2 + e * w2_bytes;
  ptrs[4 * E + i] = h + b * h_row;
  ptrs[5 * E + i] = real ? rows + b * rows_row : rows_scratch;
}

// gate_up: (M, 2I) with gate columns first -> h: (M, I) = silu(gate) * up, computed in fp32
// and stored as O (T, or fp32 for an fp16 layer's fixed path, where it cannot overflow).
template <typename T, typename O, int VEC>
__global__ void silu_mul(const T* __restrict__ gate_up, O* __restrict__ h, long long M, int I) {
  wait_for_prior_grid();
  const long long per_row = I / VEC;
  const long long n = M * per_row;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / per_row, c = (i % per_row) * VEC;
    float g[VEC], u[VEC], o[VEC];
    load_f32<T, VEC>(gate_up + r * 2 * I + c, g);
    load_f32<T, VEC>(gate_up + r * 2 * I + I + c, u);
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = swiglu(g[j], u[j]);
    store_f32<O, VEC>(h + r * I + c, o);
  }
}

// fp16 activation rows that feed a half-precision GEMM, one warp a row: silu(gate) * up from
// gate_up (ACT), or fp32 activation rows (the syncfree path's GEMM 1 output). A row whose
// largest |value| passes 65504 is stored times 2^-e (the least e that fits; exact, as a power
// of two) and row_scale[r] = 2^e says by how much to multiply its GEMM output (scale_rows);
// other rows are stored as they are, with row_scale 1.
#define SILU_WARPS 8
template <bool ACT, int VEC>
__device__ __forceinline__ void activation_chunk(const void* src, long long r, int c, int I,
                                                 float (&o)[VEC]) {
  if (ACT) {
    const __half* gu = static_cast<const __half*>(src) + r * 2 * I;
    float g[VEC], u[VEC];
    load_f32<__half, VEC>(gu + c, g);
    load_f32<__half, VEC>(gu + I + c, u);
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = swiglu(g[j], u[j]);
  } else {
    load_f32<float, VEC>(static_cast<const float*>(src) + r * I + c, o);
  }
}

template <bool ACT, int VEC>
__global__ void half_rows_scaled(const void* __restrict__ src, __half* __restrict__ h,
                                 float* __restrict__ row_scale, long long M, int I) {
  wait_for_prior_grid();
  const int lane = threadIdx.x % 32;
  for (long long r = blockIdx.x * (long long)SILU_WARPS + threadIdx.x / 32; r < M;
       r += (long long)gridDim.x * SILU_WARPS) {
    __half* hr = h + r * I;
    float big = 0.f;
    for (int c = lane * VEC; c < I; c += 32 * VEC) {
      float o[VEC];
      activation_chunk<ACT, VEC>(src, r, c, I, o);
#pragma unroll
      for (int j = 0; j < VEC; ++j) big = fmaxf(big, fabsf(o[j]));
      store_f32<__half, VEC>(hr + c, o);
    }
    for (int off = 16; off > 0; off >>= 1) big = fmaxf(big, __shfl_xor_sync(0xffffffffu, big, off));
    float scale = 1.f;
    if (big > 65504.f && big <= 3.402823466e38f) {  // rare: rewrite the row scaled (inf/NaN stay)
      int e = max(0, ilogbf(big) - 15);
      if (ldexpf(big, -e) > 65504.f) ++e;
      const float down = ldexpf(1.f, -e);
      scale = ldexpf(1.f, e);
      for (int c = lane * VEC; c < I; c += 32 * VEC) {
        float o[VEC];
        activation_chunk<ACT, VEC>(src, r, c, I, o);
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] *= down;
        store_f32<__half, VEC>(hr + c, o);
      }
    }
    if (lane == 0) row_scale[r] = scale;
  }
}

// rows[r, :] *= row_scale[r] where row_scale[r] != 1 (the GEMM outputs of half_rows_scaled's
// scaled rows). One warp a row; rows with scale 1 cost one load.
extern "C" __global__ void scale_rows(float* __restrict__ rows, const float* __restrict__ row_scale,
                                      long long M, int H) {
  wait_for_prior_grid();
  const int lane = threadIdx.x % 32;
  for (long long r = blockIdx.x * (long long)SILU_WARPS + threadIdx.x / 32; r < M;
       r += (long long)gridDim.x * SILU_WARPS) {
    const float s = row_scale[r];
    if (s == 1.f) continue;
    for (int c = lane; c < H; c += 32) rows[r * H + c] *= s;
  }
}

// The experts for a few tokens, with no host synchronization: one matrix-vector product per
// (token, slot) pair, straight from the routing ids (no permutation). Each warp computes ROWS
// output features of one pair; its lanes stride over the reduction dimension Kd in VEC-element
// (16-byte) steps, so every weight byte is read once per pair that uses the expert.
//   GLU:  out[p, j] = silu(W[e, j] . in_p) * (W[e, N + j] . in_p)   W: (E, 2N, Kd)
//   else: out[p, j] = W[e, j] . in_p                                 W: (E, N, Kd)
// Pair p = (t, k) has expert e = ids[p]; pairs with e outside [0, E) are zero-expert slots and
// do nothing. in_p is row p / in_div of `in` (in_div = K reads x[t]; 1 reads the pair's row).
// The GLU pass also writes slot_rows[p] (p for a real slot, -1 otherwise) for the combine.
#define PAIR_WARPS 4
// X and O, the input and output types, are T, except for fp16 layers: the activation and
// the expert output rows are fp32 there (fp16 would overflow where y does not).
template <typename T, typename X, typename O, int VEC, int ROWS, bool GLU>
__global__ void __launch_bounds__(PAIR_WARPS * 32)
pair_gemv(const X* __restrict__ in, long long in_stride, int in_div,
          const int* __restrict__ ids, int E, const T* __restrict__ W, int N, int Kd,
          O* __restrict__ out, int* __restrict__ slot_rows) {
  wait_for_prior_grid();
  const long long p = blockIdx.y;
  const int e = ids[p];
  const bool real = e >= 0 && e < E;
  if (GLU && blockIdx.x == 0 && threadIdx.x == 0) slot_rows[p] = real ? (int)p : -1;
  if (!real) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j0 = (blockIdx.x * PAIR_WARPS + warp) * ROWS;
  if (j0 >= N) return;
  constexpr int MATS = GLU ? 2 : 1;
  const X* x = in + (p / in_div) * in_stride;
  const T* w[MATS][ROWS];
  const long long rows_per_expert = (long long)MATS * N;
#pragma unroll
  for (int m = 0; m < MATS; ++m)
#pragma unroll
    for (int r = 0; r < ROWS; ++r)  // rows past N repeat row j0: computed, never stored
      w[m][r] = W + (e * rows_per_expert + m * N + (j0 + r < N ? j0 + r : j0)) * Kd;
  // Each lane sums 16-byte chunks (CH elements) in the same order whatever VEC is, so the
  // scalar path (misaligned or odd sizes) gives the same bits as the vector path.
  constexpr int CH = 16 / sizeof(T);
  float acc[MATS][ROWS] = {};
#pragma unroll 2
  for (int c = lane * CH; c < Kd; c += 32 * CH) {
#pragma unroll
    for (int v = 0; v < CH; v += VEC) {
      if (VEC == 1 && c + v >= Kd) break;
      float xv[VEC];
      load_f32<X, VEC>(x + c + v, xv);
#pragma unroll
      for (int m = 0; m < MATS; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          float wv[VEC];
          load_f32<T, VEC>(w[m][r] + c + v, wv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[m][r] = fmaf(wv[i], xv[i], acc[m][r]);
        }
    }
  }
  pair_store<T, O, MATS, ROWS, GLU>(acc, lane, j0, N, out + p * N);
}

// The experts' GEMMs in one fixed summation order (the "fixed" strategy):
//   out[r, j] = sum_k in[r, k] * W[e, j, k]   for every row r of expert e's block,
// in: (rows, Kd), W: (E, N, Kd), out: (rows, N). The blocks start at multiples of FIXED_TILE
// (expert_offsets with pad = FIXED_TILE), so a tile of rows belongs to one expert, found from
// the offsets on the device (no host synchronization; tiles past offsets[E] exit). Each output
// is one thread's fp32 FMA chain over k = 0, 1, 2, ... in order, whatever the tile, the
// number of rows or the token batch: a token's experts give the same bits in any chunk.
#define FIXED_TILE 64
#define FIXED_KSTEP 16
// X and O as in pair_gemv.
template <typename T, typename X, typename O>
__global__ void __launch_bounds__(256)
fixed_gemm_nt(const X* __restrict__ in, const T* __restrict__ W, O* __restrict__ out,
              const int* __restrict__ offsets, int E, int N, int Kd) {
  wait_for_prior_grid();
  const int row0 = blockIdx.y * FIXED_TILE;
  if (row0 >= offsets[E]) return;
  int lo = 0, hi = E;  // offsets[lo] <= row0 < offsets[hi]: the expert is lo when hi = lo + 1
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (offsets[mid] <= row0) lo = mid; else hi = mid;
  }
  const int col0 = blockIdx.x * FIXED_TILE;
  const T* w = W + (long long)lo * N * Kd;
  __shared__ float a_tile[FIXED_KSTEP][FIXED_TILE + 4];
  __shared__ float b_tile[FIXED_KSTEP][FIXED_TILE + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < Kd; k0 += FIXED_KSTEP) {
    for (int i = threadIdx.x; i < FIXED_TILE * FIXED_KSTEP; i += blockDim.x) {
      const int r = i / FIXED_KSTEP, k = i % FIXED_KSTEP;
      const bool in_k = k0 + k < Kd;  // past Kd: zeros, which leave the sums as they are
      a_tile[k][r] = in_k ? to_f32(in[(long long)(row0 + r) * Kd + k0 + k]) : 0.f;
      b_tile[k][r] = in_k && col0 + r < N ? to_f32(w[(long long)(col0 + r) * Kd + k0 + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < FIXED_KSTEP; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = a_tile[k][ty * 4 + i];
        b[i] = b_tile[k][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = col0 + tx * 4 + j;
      if (c < N) out[(long long)(row0 + ty * 4 + i) * N + c] = from_f32<O>(acc[i][j]);
    }
}
