// FP8 (e4m3, block-scaled) kernels: conversion, weight and activation quantization, and the
// pair (decode) experts reading e4m3 weights. e4m3 values are held as bytes (unsigned char);
// every rounding to e4m3 is from fp32, to nearest even, saturating at +-448 (docs/spec.md).
#include "common.cuh"
#include "async_mma.cuh"

#define E4M3_MAX 448.f
#define ACT_EPS 1e-10f
#define QBLOCK 128
#define PAIR_WARPS 4  // as in experts.cu (experts/_common.py PAIR_WARPS)

// The conversions are written out (no cuda_fp8.h: only portable headers are included; the
// hardware e4m3 convert exists from sm_89 only). Same results as cuda_fp8.h's
// __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3): round to nearest even, finite values
// saturate at +-448 (infinities too), NaN -> 0x7f with the sign.
__device__ __forceinline__ unsigned char e4m3_bits(float v) {
  const unsigned sign = (__float_as_uint(v) >> 24) & 0x80u;
  const float a = fabsf(v);
  if (a != a) return (unsigned char)(sign | 0x7fu);
  if (a >= E4M3_MAX) return (unsigned char)(sign | 0x7eu);
  if (a < 0.015625f) {  // below 2^-6: subnormals m * 2^-9 (m = 8 is the smallest normal)
    return (unsigned char)(sign | (unsigned)rintf(a * 512.f));
  }
  const unsigned ua = __float_as_uint(a);
  unsigned exp = (ua >> 23) - 127u + 7u, r = (ua >> 20) & 7u;
  const unsigned rem = ua & 0xfffffu;  // the 20 dropped mantissa bits: round to nearest even
  if (rem > 0x80000u || (rem == 0x80000u && (r & 1u))) ++r;
  if (r == 8u) {
    r = 0u;
    ++exp;
  }
  return (unsigned char)(sign | (exp << 3) | r);
}
// e4m3 -> fp32, exact: the 7 magnitude bits placed at an fp16's exponent and top mantissa bits
// make an fp16 (normal or subnormal alike) worth 2^-8 of the e4m3 value; 0x7f / 0xff are NaN.
__device__ __forceinline__ float e4m3_value(unsigned char b) {
  const unsigned short h = (unsigned short)(((b & 0x80u) << 8) | ((b & 0x7fu) << 7));
  const float v = __half2float(__ushort_as_half(h)) * 256.f;
  return (b & 0x7fu) == 0x7fu ? __int_as_float(0x7fffffff) : v;
}
// The e4m3 value nearest to v (as fp32; exact).
__device__ __forceinline__ float e4m3_round(float v) { return e4m3_value(e4m3_bits(v)); }

// Two at a time in the hot loops: the hardware converts from sm_89 on (the same results as
// the functions above: round to nearest even, saturating finite; only NaN's sign may differ).
// Two e4m3 bytes -> their values as an f16x2 (exact: every e4m3 value is an fp16; the low byte
// in the low half).
__device__ __forceinline__ unsigned e4m3x2_to_f16x2(unsigned short two) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  unsigned h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(two));
  return h2;
#else
  const __half2 h = __floats2half2_rn(e4m3_value((unsigned char)(two & 0xffu)),
                                      e4m3_value((unsigned char)(two >> 8)));
  return *reinterpret_cast<const unsigned*>(&h);
#endif
}
__device__ __forceinline__ void e4m3x2_values(unsigned short two, float& lo, float& hi) {
  const unsigned h2 = e4m3x2_to_f16x2(two);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h2));
  lo = f.x;
  hi = f.y;
}

// v[i] <- e4m3(v[i]), N even.
template <int N>
__device__ __forceinline__ void e4m3_round_n(float (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N; i += 2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short two;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(two) : "f"(v[i + 1]), "f"(v[i]));
    e4m3x2_values(two, v[i], v[i + 1]);
#else
    v[i] = e4m3_round(v[i]);
    v[i + 1] = e4m3_round(v[i + 1]);
#endif
  }
}

// out[i] <- the values of N e4m3 bytes (N even).
template <int N>
__device__ __forceinline__ void e4m3_values_n(const unsigned char (&b)[N], float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; i += 2)
    e4m3x2_values((unsigned short)(b[i] | (b[i + 1] << 8)), out[i], out[i + 1]);
}

extern "C" __global__ void e4m3_encode(const float* __restrict__ in, unsigned char* __restrict__ out,
                                       long long n) {
  wait_for_prior_grid();
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    out[i] = e4m3_bits(in[i]);
}

extern "C" __global__ void e4m3_decode(const unsigned char* __restrict__ in, float* __restrict__ out,
                                       long long n) {
  wait_for_prior_grid();
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    out[i] = e4m3_value(in[i]);
}

__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// One block per 128x128 block of one matrix (blockIdx.z) of w: (count, n, k) ->
// q (count, n, k) e4m3 bytes, s (count, ceil(n/128), ceil(k/128)) fp32:
// s = max|w| / 448 (1 where that is 0), q = e4m3(w / s).
template <typename T>
__global__ void __launch_bounds__(256)
quantize_blocks(const T* __restrict__ w, unsigned char* __restrict__ q, float* __restrict__ s,
                int n, int k) {
  wait_for_prior_grid();
  const int r0 = blockIdx.y * QBLOCK, c0 = blockIdx.x * QBLOCK;
  const int rows = min(QBLOCK, n - r0), cols = min(QBLOCK, k - c0);
  const long long base = (long long)blockIdx.z * n * k;
  float amax = 0.f;
  int bad = 0;
  for (int i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const int r = i / cols, c = i % cols;
    const float v = to_f32(w[base + (long long)(r0 + r) * k + c0 + c]);
    amax = fmaxf(amax, fabsf(v));
    bad |= !isfinite(v);
  }
  __shared__ float partial[8];
  amax = warp_max(amax);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = amax;
  bad = __syncthreads_or(bad);
  amax = 0.f;
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, partial[i]);
  float scale = amax / E4M3_MAX;
  if (scale == 0.f) scale = 1.f;  // a zero block, or an amax whose quotient underflows
  // A non-finite weight makes the block's scale NaN: the caller checks the scales.
  if (threadIdx.x == 0)
    s[((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] =
        bad ? __int_as_float(0x7fffffff) : scale;
  for (int i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const int r = i / cols, c = i % cols;
    const long long at = base + (long long)(r0 + r) * k + c0 + c;
    q[at] = e4m3_bits(to_f32(w[at]) / scale);
  }
}

// Where the scale of row r, group g goes for the per-expert block-scaled GEMMs: M-major (what
// cuBLASLt's VEC128 activation scales are documented to want), each expert's rows
// [offsets[e], offsets[e+1]) get their own [groups, rows_e] block starting at
// offsets[e] * groups; else K-major, [rows, groups] (each expert's block is a row range).
__device__ __forceinline__ long long act_scale_index(const int* offsets, int E, int r, int g,
                                                     int groups, int m_major) {
  if (!m_major) return (long long)r * groups + g;
  int lo = 0, hi = E;  // offsets[lo] <= r < offsets[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (offsets[mid] <= r) lo = mid; else hi = mid;
  }
  const int rows_e = offsets[lo + 1] - offsets[lo];
  return (long long)offsets[lo] * groups + (long long)g * rows_e + (r - offsets[lo]);
}

// Quantize one 128-feature group held by a warp (4 values per lane, zeros past the row's
// end): sa = max(max|a|, 1e-10) / 448, v <- e4m3(v / sa) as fp32 values. Returns sa.
__device__ __forceinline__ float quantize_group_warp(float (&v)[4]) {
  float m = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) m = fmaxf(m, fabsf(v[i]));
  const float sa = fmaxf(warp_max(m), ACT_EPS) / E4M3_MAX;
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] /= sa;
  e4m3_round_n(v);
  return sa;
}

// Writes one quantized group: e4m3 bytes to q and sa to scales (layout act_scale_index), or,
// with deq non-null, the dequantized a' = q * sa in fp32 (the fallback's fp32 GEMMs read it:
// rounded to bf16, a' would move gate / up and with them h's quantization grid).
__device__ __forceinline__ void store_group(const float (&v)[4], float sa, int r, int g, int K,
                                            int c, const int* offsets, int E, int m_major,
                                            unsigned char* q, float* scales, float* deq) {
  const long long at = (long long)r * K + c;
  if (deq != nullptr) {
    for (int i = 0; i < 4; ++i)
      if (c + i < K) deq[at + i] = v[i] * sa;
    return;
  }
  if (K % 4 == 0 && reinterpret_cast<unsigned long long>(q) % 4 == 0) {  // one 4-byte store
    if (c < K)
      *reinterpret_cast<unsigned*>(q + at) = e4m3_bits(v[0]) | e4m3_bits(v[1]) << 8 |
                                             e4m3_bits(v[2]) << 16 | (unsigned)e4m3_bits(v[3]) << 24;
  } else {
    for (int i = 0; i < 4; ++i)
      if (c + i < K) q[at + i] = e4m3_bits(v[i]);
  }
  if (threadIdx.x % 32 == 0)
    scales[act_scale_index(offsets, E, r, g, (K + QBLOCK - 1) / QBLOCK, m_major)] = sa;
}

// One warp's part of a row's quantization: groups blockIdx.y, blockIdx.y + gridDim.y, ... of
// row (K features) into row r of q and scales (store_group). vec: a lane's 4 features in one
// load (K % 4 == 0 and row 4-element aligned).
template <typename T>
__device__ __forceinline__ void quantize_row_groups(const T* __restrict__ row, int K, int r,
                                                    bool vec, const int* __restrict__ offsets,
                                                    int E, int m_major,
                                                    unsigned char* __restrict__ q,
                                                    float* __restrict__ scales,
                                                    float* __restrict__ deq) {
  for (int g = blockIdx.y; g * QBLOCK < K; g += gridDim.y) {
    const int c = g * QBLOCK + (threadIdx.x % 32) * 4;
    float v[4];
    if (vec) {
      struct alignas(4 * sizeof(T)) Four { T e[4]; } f;
      if (c < K) f = *reinterpret_cast<const Four*>(row + c);
      for (int i = 0; i < 4; ++i) v[i] = c < K ? to_f32(f.e[i]) : 0.f;
    } else {
      for (int i = 0; i < 4; ++i) v[i] = c + i < K ? to_f32(row[c + i]) : 0.f;
    }
    const float sa = quantize_group_warp(v);
    store_group(v, sa, r, g, K, c, offsets, E, m_major, q, scales, deq);
  }
}

// Activations a (rows, K) -> per row and 128-feature group, q and sa (or dequantized a').
// One warp per row and groups blockIdx.y, blockIdx.y + gridDim.y, ...; grid (ceil(rows / 4),
// any y up to ceil(K/128)), 128 threads: a y below the group count makes fewer blocks (one warp
// per (row, group) made 1.5 million blocks at 16384 tokens of LongCat-Flash, and launching them
// bounded the kernel: 2.5 ms on an H200 for 2.4 GB). Rows past offsets[E] (the layout's end;
// offsets may be null: every row) are skipped. The M-major scale layout needs K % 128 == 0 (the
// cuBLASLt path's rule).
template <typename T>
__global__ void __launch_bounds__(128)
quantize_rows(const T* __restrict__ a, int rows, int K, const int* __restrict__ offsets, int E,
              int m_major, unsigned char* __restrict__ q, float* __restrict__ scales,
              float* __restrict__ deq) {
  wait_for_prior_grid();
  const int r = blockIdx.x * 4 + threadIdx.x / 32;
  if (r >= rows || (offsets != nullptr && r >= offsets[E])) return;
  const bool vec = K % 4 == 0 && reinterpret_cast<unsigned long long>(a) % (4 * sizeof(T)) == 0;
  quantize_row_groups(a + (long long)r * K, K, r, vec, offsets, E, m_major, q, scales, deq);
}

// The grouped path's activations straight from x, without a gathered copy: for each real
// (token, slot) pair p (slot_rows[p] >= 0, from gather_rows without its copy), x's row p / K
// quantized into row slot_rows[p] of q and scales (K-major). One warp per pair, grid
// (ceil(pairs / 4), any y up to ceil(H/128)), 128 threads. The same bytes as gather_rows'
// copy and then quantize_rows, without writing and reading the copy (2 of 4.4 GB moved at
// 16384 tokens of LongCat-Flash).
template <typename T>
__global__ void __launch_bounds__(128)
quantize_pairs(const T* __restrict__ x, long long x_stride, int K, const int* __restrict__ slot_rows,
               long long pairs, int H, unsigned char* __restrict__ q, float* __restrict__ scales) {
  wait_for_prior_grid();
  const long long p = (long long)blockIdx.x * 4 + threadIdx.x / 32;
  if (p >= pairs) return;
  const int r = slot_rows[p];
  if (r < 0) return;
  const bool vec = H % 4 == 0 && x_stride % 4 == 0 &&
                   reinterpret_cast<unsigned long long>(x) % (4 * sizeof(T)) == 0;
  quantize_row_groups(x + (p / K) * x_stride, H, r, vec, nullptr, 0, 0, q, scales, nullptr);
}

// gate_up (rows, 2I) in T -> h = silu(gate) * up in fp32, quantized per 128 features straight
// from fp32 (docs/spec.md: h is not rounded to T first). Launch as quantize_rows over (rows, I).
template <typename T>
__global__ void __launch_bounds__(128)
silu_mul_quantize(const T* __restrict__ gate_up, int rows, int I, const int* __restrict__ offsets,
                  int E, int m_major, unsigned char* __restrict__ q, float* __restrict__ scales,
                  float* __restrict__ deq) {
  wait_for_prior_grid();
  const int r = blockIdx.x * 4 + threadIdx.x / 32, g = blockIdx.y;
  if (r >= rows || (offsets != nullptr && r >= offsets[E])) return;
  const int c = g * QBLOCK + (threadIdx.x % 32) * 4;
  float v[4];
  for (int i = 0; i < 4; ++i) {
    if (c + i < I) {
      const float gv = to_f32(gate_up[(long long)r * 2 * I + c + i]);
      const float uv = to_f32(gate_up[(long long)r * 2 * I + I + c + i]);
      v[i] = swiglu(gv, uv);
    } else {
      v[i] = 0.f;
    }
  }
  const float sa = quantize_group_warp(v);
  store_group(v, sa, r, g, I, c, offsets, E, m_major, q, scales, deq);
}

// The pair (decode) experts with e4m3 weights: as pair_gemv in experts.cu, with W e4m3 bytes
// (E, MATS*N, Kd) and S its fp32 block scales (E, MATS*ceil(N/128), ceil(Kd/128)), gate and
// up blocked separately. The input is already quantized (quantize_rows, K-major): aq e4m3
// bytes (rows, Kd), as fp32 (rows, ceil(Kd/128)); pair p reads row p / a_div (a_div = K: x's
// row of the token; 1: the pair's own h row). Each lane owns 16 consecutive features per step:
// it dots the e4m3 values with the weight bytes in fp32 and scales the partial sum by
// sa * scale_inv of the block.
//   GLU:  out (TOUT = float) = h = silu(g) * u, g and u rounded to TX;
//   else: out in TOUT (TX; fp32 for fp16 layers, whose expert outputs may pass 65504).
// VEC16: Kd and the pointers allow 16-byte loads; the scalar variant gives the same bits.
#define FP8_CH 16

// The FP8_CH e4m3 bytes p[c .. c + FP8_CH) as floats, bytes past Kd as 0: one 16-byte load when
// VEC16, else byte by byte (the same values).
template <bool VEC16>
__device__ __forceinline__ void e4m3_chunk(const unsigned char* p, int c, int Kd,
                                           float (&out)[FP8_CH]) {
  alignas(16) unsigned char b[FP8_CH];
  if (VEC16) {
    *reinterpret_cast<uint4*>(b) = *reinterpret_cast<const uint4*>(p + c);
  } else {
#pragma unroll
    for (int i = 0; i < FP8_CH; ++i) b[i] = c + i < Kd ? p[c + i] : 0;
  }
  e4m3_values_n(b, out);
}

template <typename TX, typename TOUT, int ROWS, bool GLU, bool VEC16>
__global__ void __launch_bounds__(PAIR_WARPS * 32)
pair_gemv_fp8(const unsigned char* __restrict__ aq, const float* __restrict__ as, int a_div,
              const int* __restrict__ ids, int E, const unsigned char* __restrict__ W,
              const float* __restrict__ S, int N, int Kd, TOUT* __restrict__ out,
              int* __restrict__ slot_rows, long long p0) {
  wait_for_prior_grid();
  const long long p = p0 + blockIdx.y;  // launches cover at most 65535 pairs each
  const int e = ids[p];
  const bool real = e >= 0 && e < E;
  if (GLU && blockIdx.x == 0 && threadIdx.x == 0) slot_rows[p] = real ? (int)p : -1;
  if (!real) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j0 = (blockIdx.x * PAIR_WARPS + warp) * ROWS;
  if (j0 >= N) return;
  constexpr int MATS = GLU ? 2 : 1;
  const int NB = (N + QBLOCK - 1) / QBLOCK, KB = (Kd + QBLOCK - 1) / QBLOCK;
  const long long row = p / a_div;
  const unsigned char* a = aq + row * Kd;
  const float* sa_row = as + row * KB;
  const unsigned char* w[MATS][ROWS];
  const float* s[MATS][ROWS];
#pragma unroll
  for (int m = 0; m < MATS; ++m)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {  // rows past N repeat row j0: computed, never stored
      const int j = j0 + r < N ? j0 + r : j0;
      w[m][r] = W + ((long long)e * MATS * N + (long long)m * N + j) * Kd;
      s[m][r] = S + ((long long)e * MATS * NB + m * NB + j / QBLOCK) * KB;
    }
  float acc[MATS][ROWS] = {};
#pragma unroll 2
  for (int c = lane * FP8_CH; c < Kd; c += 32 * FP8_CH) {
    const int g = c / QBLOCK;
    float av[FP8_CH];
    e4m3_chunk<VEC16>(a, c, Kd, av);
    const float sa = sa_row[g];
#pragma unroll
    for (int m = 0; m < MATS; ++m)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float wv[FP8_CH];
        e4m3_chunk<VEC16>(w[m][r], c, Kd, wv);
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < FP8_CH; ++i) d = fmaf(av[i], wv[i], d);
        acc[m][r] = fmaf(d, sa * s[m][r][g], acc[m][r]);
      }
  }
  pair_store<TX, TOUT, MATS, ROWS, GLU>(acc, lane, j0, N, out + p * N);
}

// pair_gemv_fp8's product on the e4m3 tensor cores (compute capability 8.9 and up), straight
// from the bytes: no conversions, which bound pair_gemv_fp8 near half the memory bandwidth.
// A warp takes PM_FEATS = 16 output features (of each of MATS matrices) of one pair:
// mma.sync m16n8k32 with the 16 weight rows as A and the pair's activation as every column of
// B, so each mma consumes 512 weight bytes. Lane (g, q) = (lane / 4, lane % 4) loads 16 bytes
// of rows g and g + 8 and of the activation at byte 16 q of each 64-byte step; the first two
// words feed one mma (A's k = 4q.., 16 + 4q.. and B's alike), the last two the next. Which k a
// register stands for depends on q only, for A and B alike: a permutation of the step's 64 k's,
// which leaves every dot product unchanged. Per 128-wide k-group the fp32 tensor-core sums are
// scaled by sa * scale_inv and added in fp32 (the per-group promotion of DeepSeek-V3).
// KSPLIT warps of a block share a tile, each summing a consecutive range of its k-groups, the
// block adding their sums in range order (more warps in flight at very few pairs).
// Same arguments as pair_gemv_fp8; needs Kd % 16 == 0 and 16-byte aligned rows.
#define PM_FEATS 16
template <typename TX, typename TOUT, bool GLU, int KSPLIT>
__global__ void __launch_bounds__(PAIR_WARPS * 32)
pair_mma_fp8(const unsigned char* __restrict__ aq, const float* __restrict__ as, int a_div,
             const int* __restrict__ ids, int E, const unsigned char* __restrict__ W,
             const float* __restrict__ S, int N, int Kd, TOUT* __restrict__ out,
             int* __restrict__ slot_rows, long long p0) {
  wait_for_prior_grid();
  static_assert(PAIR_WARPS % KSPLIT == 0, "KSPLIT warps share a tile of 16 features");
  static_assert(STREAM_DEPTH % 2 == 0, "STREAM_DEPTH: whole 128-wide k-groups");
  const long long p = p0 + blockIdx.y;  // launches cover at most 65535 pairs each
  const int e = ids[p];
  const bool real = e >= 0 && e < E;
  if (GLU && blockIdx.x == 0 && threadIdx.x == 0) slot_rows[p] = real ? (int)p : -1;
  if (!real) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  // KSPLIT warps take one tile's k-groups in KSPLIT consecutive ranges; the block sums them
  const int part = warp % KSPLIT;
  const int j0 = (blockIdx.x * (PAIR_WARPS / KSPLIT) + warp / KSPLIT) * PM_FEATS;
  constexpr int MATS = GLU ? 2 : 1;
  const int NB = (N + QBLOCK - 1) / QBLOCK, KB = (Kd + QBLOCK - 1) / QBLOCK;
  const int kb0 = part * KB / KSPLIT, kb1 = (part + 1) * KB / KSPLIT;
  const long long row = p / a_div;
  const unsigned char* a[1] = {aq + row * Kd + 16 * q};
  const bool has[1] = {true};
  const float* sa_row = as + row * KB;
  // this lane's weight rows j0 + g and j0 + g + 8 (rows past N read row 0: never stored); the
  // warp's 16 rows lie in one 128-row block, so one scale per k-group serves them all.
  const unsigned char* w[MATS][2];
  stream_weight_rows<unsigned char, MATS>(W, e, N, Kd, j0, 0, g, q, w);
  const float* s[MATS];
#pragma unroll
  for (int m = 0; m < MATS; ++m)
    s[m] = S + ((long long)e * MATS * NB + m * NB + (j0 < N ? j0 : 0) / QBLOCK) * KB;
  float acc[MATS][2] = {};  // rows g and g + 8 (every column of C holds the same token)
  // bytes [k0, k1) of the rows: this warp's k-groups (none for a tile past N)
  const int k0 = (j0 < N ? kb0 : kb1) * QBLOCK, k1 = min(Kd, kb1 * QBLOCK);
  StreamStep<MATS, 1> ring[STREAM_DEPTH];  // 64-byte steps in flight (async_mma.cuh)
#pragma unroll
  for (int i = 0; i < STREAM_DEPTH; ++i)
    stream_load<unsigned char, MATS, 1>(ring[i], w, a, has, k0 + 64 * i, k1, q);
  for (int c0 = k0; c0 < k1; c0 += 64 * STREAM_DEPTH) {
#pragma unroll
    for (int i = 0; i < STREAM_DEPTH; i += 2) {  // one 128-wide k-group: steps i, i + 1
      const int c = c0 + 64 * i;
      if (c < k1) {  // (warp-uniform)
        float d[MATS][4] = {};
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const StreamStep<MATS, 1>& st = ring[i + u];
#pragma unroll
          for (int m = 0; m < MATS; ++m) {
            mma_e4m3_16832(d[m], st.lo[m].x, st.hi[m].x, st.lo[m].y, st.hi[m].y, st.b[0].x,
                           st.b[0].y);
            mma_e4m3_16832(d[m], st.lo[m].z, st.hi[m].z, st.lo[m].w, st.hi[m].w, st.b[0].z,
                           st.b[0].w);
          }
        }
        const int kb = c / QBLOCK;
        const float sa = sa_row[kb];
#pragma unroll
        for (int m = 0; m < MATS; ++m) {
          const float f = sa * s[m][kb];
          acc[m][0] = fmaf(d[m][0], f, acc[m][0]);  // row g (column 2q)
          acc[m][1] = fmaf(d[m][2], f, acc[m][1]);  // row g + 8
        }
      }
#pragma unroll
      for (int u = 0; u < 2; ++u)
        stream_load<unsigned char, MATS, 1>(ring[i + u], w, a, has,
                                            c0 + 64 * (i + u + STREAM_DEPTH), k1, q);
    }
  }
  if constexpr (KSPLIT > 1) {  // the later ranges' sums to shared memory, added in range order
    __shared__ float partial[PAIR_WARPS][MATS][2][8];
    if (part > 0 && q == 0) {
#pragma unroll
      for (int m = 0; m < MATS; ++m) {
        partial[warp][m][0][g] = acc[m][0];
        partial[warp][m][1][g] = acc[m][1];
      }
    }
    __syncthreads();
    if (part > 0) return;
#pragma unroll
    for (int k = 1; k < KSPLIT; ++k)
#pragma unroll
      for (int m = 0; m < MATS; ++m) {
        acc[m][0] += partial[warp + k][m][0][g];
        acc[m][1] += partial[warp + k][m][1][g];
      }
  }
  if (q == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int f = j0 + g + 8 * i;
      if (f < N) {
        const float v = GLU ? swiglu_rounded<TX>(acc[0][i], acc[MATS - 1][i]) : acc[0][i];
        out[p * N + f] = from_f32<TOUT>(v);
      }
    }
  }
}

// The grouped experts with pair_mma_fp8's weight stream: each warp streams 16 weight rows
// (of each of MATS matrices) of one active expert straight from global memory into mma.sync
// m16n8k32 as A, and takes the expert's rows as B's columns, 8 per n-tile and NT tiles per
// pass (an expert of more rows makes more passes, reading its weights again, mostly from L2).
// Lane (g, q) loads 16 bytes of weight rows g, g + 8 and of the expert's row 8 t + g per tile
// t at byte 16 q of each 64-byte step (the k permutation of pair_mma_fp8). Per 128-wide
// k-group the fp32 sums of C (weight row, expert row) are scaled by sa[row] * scale_inv and
// added in fp32. No shared memory, no block synchronization: the weights of an expert with a
// few rows are read once at the rate of the pair kernel. Grid: (ceil(N / (16 PAIR_WARPS)),
// slots), blocks past the active count (active / offsets from syncfree_plan) exit at once.
//   aq: (rows, Kd) e4m3 bytes in expert order, as: (rows, ceil(Kd/128)) fp32 (quantize_rows,
//   K-major); W / S as in pair_gemv_fp8. GLU: out (TOUT = float) = h = silu(g) * u, g and u
//   rounded to TX; else out in TOUT (TX; fp32 for fp16). Needs Kd % 16 == 0 and 16-byte
//   aligned rows.
template <typename TX, typename TOUT, bool GLU, int NT>
__global__ void __launch_bounds__(PAIR_WARPS * 32)
grouped_stream_fp8(const unsigned char* __restrict__ aq, const float* __restrict__ as,
                   const int* __restrict__ offsets, const int* __restrict__ active,
                   const unsigned char* __restrict__ W, const float* __restrict__ S, int N,
                   int Kd, TOUT* __restrict__ out) {
  wait_for_prior_grid();
  static_assert(STREAM_DEPTH % 2 == 0, "STREAM_DEPTH: whole 128-wide k-groups");
  const int slot = blockIdx.y;
  if (slot >= active[0]) return;
  const int e = active[1 + slot];
  const int row0 = offsets[e], m = offsets[e + 1] - row0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int j0 = (blockIdx.x * PAIR_WARPS + warp) * PM_FEATS;
  if (j0 >= N) return;
  constexpr int MATS = GLU ? 2 : 1;
  const int NB = (N + QBLOCK - 1) / QBLOCK, KB = (Kd + QBLOCK - 1) / QBLOCK;
  const unsigned char* w[MATS][2];
  stream_weight_rows<unsigned char, MATS>(W, e, N, Kd, j0, j0, g, q, w);
  const float* s_[MATS];  // the scale_inv row of this tile's 128-row block in each matrix
#pragma unroll
  for (int mat = 0; mat < MATS; ++mat)
    s_[mat] = S + ((long long)e * MATS * NB + mat * NB + j0 / QBLOCK) * KB;
  for (int r0 = 0; r0 < m; r0 += 8 * NT) {
    const unsigned char* a[NT];  // this lane's B column of tile t: the expert's row r0 + 8 t + g
    bool has[NT];
    stream_expert_rows<unsigned char, NT>(aq, row0, m, r0, Kd, g, q, a, has);
    float acc[MATS][NT][4] = {};  // C: weight rows g, g + 8 x the tile's rows 2q, 2q + 1
    StreamStep<MATS, NT> ring[STREAM_DEPTH];  // 64-byte steps in flight (async_mma.cuh)
#pragma unroll
    for (int s = 0; s < STREAM_DEPTH; ++s)
      stream_load<unsigned char, MATS, NT>(ring[s], w, a, has, 64 * s, Kd, q);
    for (int c0 = 0; c0 < Kd; c0 += 64 * STREAM_DEPTH) {
#pragma unroll
      for (int s = 0; s < STREAM_DEPTH; s += 2) {  // one 128-wide k-group: steps s, s + 1
        const int kb = (c0 + 64 * s) / QBLOCK;
        if (kb < KB) {  // (warp-uniform)
          float d[MATS][NT][4] = {};
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const StreamStep<MATS, NT>& st = ring[s + u];
#pragma unroll
            for (int t = 0; t < NT; ++t) {
              if (r0 + 8 * t >= m) break;  // tiles past the expert's rows: none
#pragma unroll
              for (int mat = 0; mat < MATS; ++mat) {
                mma_e4m3_16832(d[mat][t], st.lo[mat].x, st.hi[mat].x, st.lo[mat].y,
                               st.hi[mat].y, st.b[t].x, st.b[t].y);
                mma_e4m3_16832(d[mat][t], st.lo[mat].z, st.hi[mat].z, st.lo[mat].w,
                               st.hi[mat].w, st.b[t].z, st.b[t].w);
              }
            }
          }
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            if (r0 + 8 * t >= m) break;
            float sa[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const int r = r0 + 8 * t + 2 * q + i;
              sa[i] = r < m ? as[(long long)(row0 + r) * KB + kb] : 0.f;
            }
#pragma unroll
            for (int mat = 0; mat < MATS; ++mat) {
              const float sw = s_[mat][kb];
#pragma unroll
              for (int i = 0; i < 4; ++i)
                acc[mat][t][i] = fmaf(d[mat][t][i], sa[i % 2] * sw, acc[mat][t][i]);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u)
          stream_load<unsigned char, MATS, NT>(ring[s + u], w, a, has,
                                               c0 + 64 * (s + u + STREAM_DEPTH), Kd, q);
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int j = j0 + g + 8 * (i / 2), r = r0 + 8 * t + 2 * q + i % 2;
        if (j < N && r < m) {
          const float v =
              GLU ? swiglu_rounded<TX>(acc[0][t][i], acc[MATS - 1][t][i]) : acc[0][t][i];
          out[(long long)(row0 + r) * N + j] = from_f32<TOUT>(v);
        }
      }
    }
  }
}

// The experts for a moderate number of rows, with no host synchronization: each block takes
// one expert (blockIdx.y) and PAIR_WARPS * ROWS output features, and runs over the expert's
// rows [offsets[e], offsets[e+1]) MT at a time, so the weights are read once per expert (then
// from L2). The inputs are already quantized: aq e4m3 bytes (rows, Kd), as fp32 (rows,
// ceil(Kd/128)) (quantize_rows, K-major). W / S as in pair_gemv_fp8.
//   GLU:  out (TOUT = float) = h = silu(g) * u, g and u rounded to TX;
//   else: out in TOUT (TX; fp32 for fp16 layers, whose expert outputs may pass 65504).
#define GROUPED_MT 4
template <typename TX, typename TOUT, int ROWS, bool GLU, bool VEC16>
__global__ void __launch_bounds__(PAIR_WARPS * 32)
grouped_gemv_fp8(const unsigned char* __restrict__ aq, const float* __restrict__ as,
                 const int* __restrict__ offsets, const unsigned char* __restrict__ W,
                 const float* __restrict__ S, int N, int Kd, TOUT* __restrict__ out) {
  wait_for_prior_grid();
  const int e = blockIdx.y;
  const int r0 = offsets[e], r1 = offsets[e + 1];
  if (r0 >= r1) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j0 = (blockIdx.x * PAIR_WARPS + warp) * ROWS;
  if (j0 >= N) return;
  constexpr int MATS = GLU ? 2 : 1;
  constexpr int MT = GROUPED_MT;
  const int NB = (N + QBLOCK - 1) / QBLOCK, KB = (Kd + QBLOCK - 1) / QBLOCK;
  const unsigned char* w[MATS][ROWS];
  const float* s[MATS][ROWS];
#pragma unroll
  for (int m = 0; m < MATS; ++m)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int j = j0 + r < N ? j0 + r : j0;
      w[m][r] = W + ((long long)e * MATS * N + (long long)m * N + j) * Kd;
      s[m][r] = S + ((long long)e * MATS * NB + m * NB + j / QBLOCK) * KB;
    }
  for (int t0 = r0; t0 < r1; t0 += MT) {
    float acc[MATS][ROWS][MT] = {};
    for (int c = lane * FP8_CH; c < Kd; c += 32 * FP8_CH) {
      const int g = c / QBLOCK;
      float wv[MATS][ROWS][FP8_CH];
      float ws[MATS][ROWS];
#pragma unroll
      for (int m = 0; m < MATS; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          e4m3_chunk<VEC16>(w[m][r], c, Kd, wv[m][r]);
          ws[m][r] = s[m][r][g];
        }
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        if (t0 + t >= r1) break;
        const long long row = t0 + t;
        float av[FP8_CH];
        e4m3_chunk<VEC16>(aq + row * Kd, c, Kd, av);
        const float sa = as[row * KB + g];
#pragma unroll
        for (int m = 0; m < MATS; ++m)
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            float d = 0.f;
#pragma unroll
            for (int i = 0; i < FP8_CH; ++i) d = fmaf(av[i], wv[m][r][i], d);
            acc[m][r][t] = fmaf(d, sa * ws[m][r], acc[m][r][t]);
          }
      }
    }
#pragma unroll
    for (int t = 0; t < MT; ++t) {
#pragma unroll
      for (int m = 0; m < MATS; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[m][r][t] = warp_sum(acc[m][r][t]);
      if (lane < ROWS && j0 + lane < N && t0 + t < r1) {
        float v = 0.f;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (r == lane) {
            v = GLU ? swiglu_rounded<TX>(acc[0][r][t], acc[MATS - 1][r][t]) : acc[0][r][t];
          }
        }
        out[(long long)(t0 + t) * N + j0 + lane] = from_f32<TOUT>(v);
      }
    }
  }
}

// ---- Tensor-core experts (sm_80+; the hardware e4m3 convert from sm_89) --------------------
// cp.async and mma.sync from async_mma.cuh (inline PTX).

// The grouped experts on the tensor cores, exact FP8 math (docs/spec.md): E4M3 (compute
// capability 8.9 and up): the e4m3 weight and activation bytes go to mma.sync m16n8k32 as they
// are; else they are converted to fp16 in registers (exact) for mma.sync m16n8k16. Either way
// products are exact, accumulated in fp32 over each 128-wide k-group, and the group's
// fp32 partial is scaled by sa[row, g] * scale_inv[block, g] and added to the fp32 total.
// A fixed grid of (feature chunk, active-expert slot) blocks (active / offsets from
// syncfree_plan); blocks past the active count exit at once. Each block streams its 128 weight
// rows of one expert through shared memory (16-byte cp.async, G8_STAGES deep) and multiplies
// them with the expert's rows, G8_MT at a time (16-row tiles past the rows are skipped), so
// with few rows per expert the weights are read once at the copy rate.
//   aq: (rows, Kd) e4m3 bytes in expert order, as: (rows, ceil(Kd/128)) fp32 (quantize_rows,
//   K-major); W: (E, MATS * N, Kd) bytes, S: (E, MATS * ceil(N/128), ceil(Kd/128)) fp32.
//   GLU: a block takes features [64 x, 64 x + 64) of the gate and the up half and writes
//   h = silu(g) * u (TOUT = float), g and u rounded to TX first; else features
//   [128 x, 128 x + 128) in TOUT (TX; fp32 for fp16). Needs Kd % 16 == 0 and 16-byte
//   aligned aq and W; any N.
// Operand order inside a k-step: lane (g, q) = (lane / 4, lane % 4) reads 16 bytes of its row at
// byte 16 q of the stage, and the word s of them feeds k-step s: bytes 16q+4s, +1 as the
// fragment's k = 2q, 2q+1 and bytes +2, +3 as k = 2q+8, 2q+9, for A and B alike. This is a
// permutation of the stage's 64 k's applied to both operands, so the sum is the same; it lets
// every operand come from one conflict-free 16-byte shared load (no ldmatrix of bytes).
#define G8_THREADS 256
#define G8_BN 128     // weight rows per block: 16 per warp
#define G8_MT 64      // expert rows per pass: four 16-row mma tiles
// The pipeline, set by quant.py (FP8_PIPELINE as -D options; these defaults are its own):
// k bytes per stage (64: half a 128-wide scale group, or 128: a whole group) and stages. A
// stage holds G8_BK / 64 sub-tiles of 64 bytes per row, each read as in the 64-byte layout.
#ifndef G8_BK
#define G8_BK 128
#endif
#ifndef G8_STAGES
#define G8_STAGES 3
#endif
#ifndef G8_PREFETCH
#define G8_PREFETCH 128  // the weight loads' L2 prefetch, bytes (async_mma.cuh cp_async16)
#endif
#define G8_SUB ((G8_BN + G8_MT) * 64)  // bytes of one 64-byte-wide sub-tile of a stage
#define G8_LDC (G8_BN + 4)  // pitch of the fp32 result tile
template <typename TX, typename TOUT, bool GLU, bool E4M3>
__global__ void __launch_bounds__(G8_THREADS, 2)
grouped_mma_fp8(const unsigned char* __restrict__ aq, const float* __restrict__ as,
                const int* __restrict__ offsets, const int* __restrict__ active,
                const unsigned char* __restrict__ W, const float* __restrict__ S, int N, int Kd,
                TOUT* __restrict__ out) {
  wait_for_prior_grid();
  const int slot = blockIdx.y;
  if (slot >= active[0]) return;
  const int e = active[1 + slot];
  const int row0 = offsets[e], m = offsets[e + 1] - row0;
  constexpr int FEAT = GLU ? G8_BN / 2 : G8_BN;
  const int f0 = blockIdx.x * FEAT;
  if (f0 >= N) return;
  constexpr int MATS = GLU ? 2 : 1;
  constexpr int STAGE = (G8_BN + G8_MT) * G8_BK;  // bytes: weight tile, then row tile
  static_assert(G8_BK == 64 || G8_BK == 128, "a stage: half or all of one scale group");
  // dynamic: G8_STAGES * STAGE bytes (at least the result tile, G8_MT * G8_LDC floats)
  extern __shared__ __align__(128) unsigned char g8_smem[];
  unsigned char* smem = g8_smem;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int NB = (N + QBLOCK - 1) / QBLOCK, KB = (Kd + QBLOCK - 1) / QBLOCK;
  const int nk = (Kd + G8_BK - 1) / G8_BK;
  const unsigned char* w_e = W + (long long)e * MATS * N * Kd;
  // The warp's 16 weight rows lie in one 128-row scale block (f0 is a multiple of FEAT).
  const float* s_w =
      S + ((long long)e * MATS * NB + (GLU && warp * 16 >= FEAT ? NB : 0) + f0 / QBLOCK) * KB;

  for (int r0 = 0; r0 < m; r0 += G8_MT) {
    const int tiles = min(G8_MT / 16, (m - r0 + 15) / 16);  // 16-row tiles holding rows
    auto issue = [&](int kt) {
      unsigned char* st = smem + (kt % G8_STAGES) * STAGE;
      const int k0 = kt * G8_BK;
#pragma unroll 1
      for (int i = threadIdx.x; i < (G8_BN + tiles * 16) * (G8_BK / 16); i += G8_THREADS) {
        const int r = i / (G8_BK / 16), k = k0 + (i % (G8_BK / 16)) * 16;
        const unsigned char* src;
        bool ok = k < Kd;
        if (r < G8_BN) {
          const int f = f0 + (GLU ? r % FEAT : r);
          ok = ok && f < N;
          src = w_e + (long long)(GLU && r >= FEAT ? N + f : f) * Kd + k;
        } else {
          ok = ok && r0 + r - G8_BN < m;
          src = aq + (long long)(row0 + r0 + r - G8_BN) * Kd + k;
        }
        const int c = i % (G8_BK / 16);  // 16-byte chunk: sub-tile c / 4, place c % 4
        unsigned char* dst = st + (c / 4) * G8_SUB + r * 64 + (c % 4) * 16;
        if (r < G8_BN)
          cp_async16<G8_PREFETCH>(dst, ok ? src : W, ok);
        else
          cp_async16<0>(dst, ok ? src : W, ok);
      }
    };
    // [tile][n]: rows 16 tile + lane / 4 (+ 8) x this warp's features 16 warp + 8 n + 2 q (+1).
    float total[G8_MT / 16][2][4] = {}, part[G8_MT / 16][2][4] = {};
    float sw = 0.f;
#pragma unroll
    for (int s = 0; s < G8_STAGES - 1; ++s) {
      if (s < nk) issue(s);
      cp_async_commit();
    }
    for (int kt = 0; kt < nk; ++kt) {
      const int g = kt * G8_BK / QBLOCK;
      if ((kt * G8_BK) % QBLOCK == 0) sw = s_w[g];  // a group starts: the weight scale
      cp_async_wait<G8_STAGES - 2>();
      __syncthreads();  // stage kt landed for all; stage kt - 1 is free to refill
      if (kt + G8_STAGES - 1 < nk) issue(kt + G8_STAGES - 1);
      cp_async_commit();
      const int q16 = (lane % 4) * 16;
#pragma unroll
      for (int sub = 0; sub < G8_BK / 64; ++sub) {  // 64-byte sub-tiles, in k order
        const unsigned char* st = smem + (kt % G8_STAGES) * STAGE + sub * G8_SUB;
        if constexpr (E4M3) {  // the bytes as they are: two m16n8k32 per 64-byte sub-tile
          unsigned b[2][4];  // [n][word]
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            const uint4 raw =
                *reinterpret_cast<const uint4*>(st + (warp * 16 + n * 8 + lane / 4) * 64 + q16);
            b[n][0] = raw.x, b[n][1] = raw.y, b[n][2] = raw.z, b[n][3] = raw.w;
          }
#pragma unroll
          for (int t = 0; t < G8_MT / 16; ++t) {
            if (t >= tiles) break;
            const unsigned char* at = st + G8_BN * 64 + (t * 16 + lane / 4) * 64 + q16;
            const uint4 lo = *reinterpret_cast<const uint4*>(at);
            const uint4 hi = *reinterpret_cast<const uint4*>(at + 8 * 64);
#pragma unroll
            for (int n = 0; n < 2; ++n) {
              mma_e4m3_16832(part[t][n], lo.x, hi.x, lo.y, hi.y, b[n][0], b[n][1]);
              mma_e4m3_16832(part[t][n], lo.z, hi.z, lo.w, hi.w, b[n][2], b[n][3]);
            }
          }
        } else {  // the bytes converted to fp16 (exact): four m16n8k16 per sub-tile
          unsigned b[2][4][2];  // [n][k-step][b0, b1]
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            const uint4 raw =
                *reinterpret_cast<const uint4*>(st + (warp * 16 + n * 8 + lane / 4) * 64 + q16);
            const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
            for (int s = 0; s < 4; ++s) {
              b[n][s][0] = e4m3x2_to_f16x2((unsigned short)(words[s] & 0xffffu));
              b[n][s][1] = e4m3x2_to_f16x2((unsigned short)(words[s] >> 16));
            }
          }
#pragma unroll
          for (int t = 0; t < G8_MT / 16; ++t) {
            if (t >= tiles) break;
            const unsigned char* at = st + G8_BN * 64 + (t * 16 + lane / 4) * 64 + q16;
            const uint4 lo = *reinterpret_cast<const uint4*>(at);
            const uint4 hi = *reinterpret_cast<const uint4*>(at + 8 * 64);
            const unsigned wl[4] = {lo.x, lo.y, lo.z, lo.w}, wh[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
            for (int s = 0; s < 4; ++s) {
              const unsigned a[4] = {e4m3x2_to_f16x2((unsigned short)(wl[s] & 0xffffu)),
                                     e4m3x2_to_f16x2((unsigned short)(wh[s] & 0xffffu)),
                                     e4m3x2_to_f16x2((unsigned short)(wl[s] >> 16)),
                                     e4m3x2_to_f16x2((unsigned short)(wh[s] >> 16))};
              mma16816<__half>(part[t][0], a, b[0][s][0], b[0][s][1]);
              mma16816<__half>(part[t][1], a, b[1][s][0], b[1][s][1]);
            }
          }
        }
      }  // sub-tiles
      if (((kt + 1) * G8_BK) % QBLOCK == 0 || kt == nk - 1) {  // the group ends: promote
#pragma unroll
        for (int t = 0; t < G8_MT / 16; ++t) {
          if (t >= tiles) break;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = r0 + t * 16 + h * 8 + lane / 4;
            const float f = r < m ? as[(long long)(row0 + r) * KB + g] * sw : 0.f;
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                total[t][n][2 * h + i] = fmaf(part[t][n][2 * h + i], f, total[t][n][2 * h + i]);
                part[t][n][2 * h + i] = 0.f;
              }
          }
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // every stage consumed: the buffers take the fp32 result tile
    float* c = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int t = 0; t < G8_MT / 16; ++t) {
      if (t >= tiles) break;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        float* p = c + (t * 16 + lane / 4) * G8_LDC + warp * 16 + n * 8 + (lane % 4) * 2;
        p[0] = total[t][n][0];
        p[1] = total[t][n][1];
        p[8 * G8_LDC] = total[t][n][2];
        p[8 * G8_LDC + 1] = total[t][n][3];
      }
    }
    __syncthreads();
    const int rows = min(G8_MT, m - r0);
    for (int i = threadIdx.x; i < rows * FEAT; i += G8_THREADS) {
      const int r = i / FEAT, j = i % FEAT;
      if (f0 + j >= N) continue;
      float v = c[r * G8_LDC + j];
      if (GLU) v = swiglu_rounded<TX>(v, c[r * G8_LDC + FEAT + j]);
      out[(long long)(row0 + r0 + r) * N + f0 + j] = from_f32<TOUT>(v);
    }
    __syncthreads();  // the result tile is read before the next pass refills the stages
  }
}
