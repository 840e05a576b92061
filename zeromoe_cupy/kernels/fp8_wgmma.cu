// The grouped FP8 experts on Hopper's warpgroup tensor cores (wgmma, compute capability 9.0,
// compiled for sm_90a): prefill, where the experts' GEMMs are compute-bound. The math of
// grouped_mma_fp8 (kernels/fp8.cu; docs/spec.md "FP8 experts"), but for the sums: the wgmma
// sums a partial of WG_PROMOTE k's (GEMM 1; 128 in GEMM 2) with fewer bits than fp32 (see
// WG_PROMOTE), and each partial is scaled by sa[row, g] * scale_inv[block, g] of its 128-wide
// k-group g and added to the fp32 total.
#include "common.cuh"
#include "async_mma.cuh"

#define QBLOCK 128
// The pipeline, set by quant.py (WGMMA_PIPELINE as -D options; these defaults are its own):
// warpgroups per block that multiply (each takes 64 of the tile's expert rows), stages, the
// order of the work items (0: an expert's row tiles inner, 1: its feature chunks inner), and
// who copies the stages (0: every thread, block-wide barriers between stages; 1: one more
// warpgroup, the producer, while the others only multiply, each stage handed over by mbarriers).
#ifndef WG_GROUPS
#define WG_GROUPS 1
#endif
#ifndef WG_STAGES
#define WG_STAGES 4
#endif
#ifndef WG_ORDER
#define WG_ORDER 0
#endif
#ifndef WG_PRODUCER
#define WG_PRODUCER 1
#endif
// k's per partial sum of the gate/up GEMM, promoted (scaled into the fp32 total) after each:
// 32, 64 or 128; the down GEMM's are 128 (a scale group). The FP8 wgmma does not sum its
// products in exact fp32 (fewer bits are kept), and gate/up errors are amplified by h's
// e4m3 quantization downstream (a value moved across a rounding boundary moves by a whole e4m3
// step), where the down GEMM's error reaches y as it is. H200, LongCat-Flash, relative
// difference to the exact mma.sync kernels at 1024 tokens: 2.7e-3 with 128-k partials, 2.3e-3
// with 64, 2.1e-3 with 32 (the exact kernels are about 2e-3 from the float64 evaluation).
#ifndef WG_PROMOTE
#define WG_PROMOTE 32
#endif
static_assert(WG_PROMOTE == 32 || WG_PROMOTE == 64 || WG_PROMOTE == 128, "WG_PROMOTE");
#define WG_THREADS (128 * (WG_GROUPS + WG_PRODUCER))
// WG_PRODUCER 1: two blocks per SM with one warpgroup that multiplies, one with two; registers
// per thread of the producer warpgroup and of the others (the producer's the fewest with which
// ptxas 13.0 spills nothing; 128 x (72 + 216 WG_GROUPS) <= 64K per SM).
#define WG_BLOCKS_PER_SM (WG_PRODUCER && WG_GROUPS == 1 ? 2 : 1)
#define WG_PRODUCER_REGS 72
#define WG_CONSUMER_REGS (WG_GROUPS == 1 ? 184 : 216)
#define WG_BM (64 * WG_GROUPS)  // expert rows per tile (wgmma's M: 64 per warpgroup)
#define WG_BN 128       // weight rows per tile (wgmma's N); GLU: 64 gate rows, then 64 up rows
#define WG_BK 128       // k bytes per stage: one scale group
#define WG_A_TILE (WG_BM * WG_BK)  // bytes of one stage's row tile
#define WG_STAGE ((WG_BM + WG_BN) * WG_BK)  // bytes of a stage: row tile, then weight tile
#ifndef WG_PREFETCH
#define WG_PREFETCH 128  // the weight copies' L2 prefetch hint (bytes): 0, 64, 128 or 256
#endif

// Where each active expert's tiles start: tile_start[s] = the tiles of tile_rows rows (the
// launch's: WG_BM, or its ROWS_N) of the active experts before slot s (active / offsets from
// syncfree_plan), tile_start[active[0]] = all of them. One block of 1024 threads; any number
// of active experts.
extern "C" __global__ void __launch_bounds__(1024)
wgmma_tile_plan(const int* __restrict__ offsets, const int* __restrict__ active,
                int* __restrict__ tile_start, int tile_rows) {
  wait_for_prior_grid();
  __shared__ int sums[1024];
  const int n = active[0], per = (n + 1023) / 1024, t = threadIdx.x;
  const int s0 = min(n, t * per), s1 = min(n, s0 + per);
  int local = 0;
  for (int s = s0; s < s1; ++s) {
    const int e = active[1 + s];
    local += (offsets[e + 1] - offsets[e] + tile_rows - 1) / tile_rows;
  }
  sums[t] = local;
  __syncthreads();
  for (int off = 1; off < 1024; off <<= 1) {  // inclusive scan (Hillis-Steele)
    const int v = t >= off ? sums[t - off] : 0;
    __syncthreads();
    sums[t] += v;
    __syncthreads();
  }
  int at = sums[t] - local;
  for (int s = s0; s < s1; ++s) {
    tile_start[s] = at;
    const int e = active[1 + s];
    at += (offsets[e + 1] - offsets[e] + tile_rows - 1) / tile_rows;
  }
  if (t == 1023) tile_start[n] = sums[1023];
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// A shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): rows of 128 bytes,
// 8-row groups 1024 bytes apart, 128-byte swizzle; the leading byte offset is unused for this
// layout (encoded 1).
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned smem_addr) {
  return (unsigned long long)((smem_addr & 0x3ffff) >> 4) | (1ull << 16) |
         ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

// d (64 x 128 fp32, wgmma's accumulator layout) = (accumulate ? d : 0) + A (64 x 32 e4m3, rows
// K-major) * B (128 x 32 e4m3, rows K-major)^T, both from shared memory.
__device__ __forceinline__ void wgmma_m64n128k32(float (&d)[64], unsigned long long desc_a,
                                                 unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
        "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
        "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// d (64 x N fp32) = (accumulate ? d : 0) + A (64 x 32 e4m3) * B (N x 32 e4m3)^T for the
// tiles whose expert rows are wgmma's N (ROWS_N of grouped_wgmma_fp8): N = 16 or 32.
__device__ __forceinline__ void wgmma_m64k32(float (&d)[8], unsigned long long desc_a,
                                             unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_m64k32(float (&d)[16], unsigned long long desc_a,
                                             unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, "
      "p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),
        "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// Keeps the compiler from moving reads or writes of the accumulators across the wgmma
// fences and waits (asm volatile statements keep their order; plain arithmetic does not).
template <int N>
__device__ __forceinline__ void fence_registers(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// mbarriers (PTX ISA "mbarrier"): a stage's hand-over between the producer and the consumers.
__device__ __forceinline__ void mbar_init(unsigned long long* bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)),
               "r"(arrivals));
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(
                   smem_address(bar))
               : "memory");
}
// waits until the phase of the given parity has completed
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(smem_address(bar)),
      "r"(parity)
      : "memory");
}
// an arrival on bar once this thread's cp.async copies so far have landed (counted in the
// barrier's arrivals: noinc)
__device__ __forceinline__ void cp_async_mbar_arrive(unsigned long long* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_address(bar))
               : "memory");
}
#endif

// A work item of grouped_wgmma_fp8: expert e, whose rows start at row0 of aq / out; the tile's
// rows [r0, r0 + rows) of the expert's and features [f0, f0 + FEAT).
struct WgItem {
  int e, row0, r0, rows, f0;
};

// Item i of the persistent grid's list: (active slot s, feature chunk c, row tile t) in that
// order (WG_ORDER 0; 1: c and t swapped), so the blocks running side by side share one chunk
// of weights (read from DRAM once, then from L2) across the expert's row tiles.
template <int FEAT, int BM>
__device__ __forceinline__ WgItem wg_item(long long item, int chunks, int slots,
                                          const int* __restrict__ offsets,
                                          const int* __restrict__ active,
                                          const int* __restrict__ tile_start) {
  // the item's slot: tile_start[s] * chunks <= item < tile_start[s + 1] * chunks
  const int u = (int)(item / chunks);
  int lo = 0, hi = slots;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tile_start[mid] <= u) lo = mid; else hi = mid;
  }
  WgItem it;
  it.e = active[1 + lo];
  it.row0 = offsets[it.e];
  const int m = offsets[it.e + 1] - it.row0;
  const int local = (int)(item - (long long)tile_start[lo] * chunks);
#if WG_ORDER == 0
  const int tiles = (m + BM - 1) / BM;
  it.f0 = (local / tiles) * FEAT;
  it.r0 = (local % tiles) * BM;
#else
  it.f0 = (local % chunks) * FEAT;
  it.r0 = (local / chunks) * BM;
#endif
  it.rows = min(BM, m - it.r0);
  return it;
}

// One item's stage copies by THREADS threads (thread t): 16-byte chunk t % 8 of rows t / 8 +
// THREADS / 8 i of the row tile and of the weight tile, into a stage's 128-byte-swizzled tiles
// (16-byte chunk j of row r at chunk j ^ (r % 8): what the descriptor's swizzle mode reads).
template <bool GLU, int THREADS>
struct WgCopier {
  // rows one pass of copies covers; passes over the row tile and the weight tile (GLU: half of
  // them over gate rows, half over up rows)
  enum { ROWS = THREADS / 8, AC = WG_BM / ROWS, WC = WG_BN / ROWS, FEAT = GLU ? WG_BN / 2 : WG_BN };
  static_assert(FEAT % ROWS == 0, "a pass covers gate rows or up rows, not both");
  // addresses are formed per copy from these (fewer registers: the producer warpgroup of the
  // WG_PRODUCER pipeline has few)
  const unsigned char* a_src;  // chunk j of the tile's row r
  const unsigned char* w_src;  // chunk j of weight row f0 + r (GLU: of gate)
  const unsigned char* unread;  // a valid address for the zero-filling copies
  long long pass, up;  // bytes of ROWS rows; of N rows (gate -> up)
  int a_left, w_left;  // rows of the tile, features of the matrix from row r / feature f0 + r on
  int j, r;

  __device__ __forceinline__ WgCopier(int t, const WgItem& it, const unsigned char* aq,
                                      const unsigned char* W, int N, int Kd) {
    constexpr int MATS = GLU ? 2 : 1;
    j = t % 8;
    r = t / 8;
    pass = (long long)ROWS * Kd;
    up = (long long)N * Kd;
    a_left = it.rows - r;
    w_left = N - it.f0 - r;
    unread = W;
    a_src = aq + (long long)(it.row0 + it.r0 + r) * Kd + 16 * j;
    w_src = W + ((long long)it.e * MATS * N + it.f0 + r) * Kd + 16 * j;
  }

  // stage kt (k bytes [128 kt, 128 kt + 128)) into st
  __device__ __forceinline__ void issue(unsigned char* st, int kt, int Kd) const {
    const bool inside = kt * WG_BK + 16 * j < Kd;  // zeros past Kd, in both operands
    const long long k0 = (long long)kt * WG_BK;
#pragma unroll
    for (int i = 0; i < AC; ++i) {
      const int row = r + ROWS * i;
      // rows past the tile's end are not copied: a row of the product depends on its own
      // row only, and those are never stored
      if (ROWS * i < a_left)
        cp_async16<0>(st + row * WG_BK + ((j ^ (row % 8)) * 16), a_src + i * pass + k0, inside);
    }
#pragma unroll
    for (int i = 0; i < WC; ++i) {
      const int row = r + ROWS * i;
      const int fi = GLU ? i % (FEAT / ROWS) : i;  // the pass's feature offset, in passes
      const bool ok = inside && ROWS * fi < w_left;
      const unsigned char* src = w_src + fi * pass + (GLU && row >= FEAT ? up : 0) + k0;
      cp_async16<WG_PREFETCH>(st + WG_A_TILE + row * WG_BK + ((j ^ (row % 8)) * 16),
                              ok ? src : unread, ok);
    }
  }
};

// The scales of a stage's k-group kt: rows ra and rb's (a, b) and the weight block's of gate
// (or the only matrix) and up. Loaded a stage ahead by the kernel: the promotion after a
// stage's first wgmma needs them, and a load from L2 takes longer than that wgmma.
struct WgScales {
  float a, b, gate, up;
};

// Where an item's scales lie for this thread's accumulator rows ra and rb (clamped into the
// tile: rows past it are computed, never stored), as (rows, KB) and (E, MATS * NB, KB) fp32.
template <bool GLU>
struct WgScaleRows {
  const float *sa_a, *sa_b, *sw_gate, *sw_up;

  __device__ __forceinline__ WgScaleRows(const WgItem& it, int ra, int rb, const float* as,
                                         const float* S, int NB, int KB) {
    constexpr int MATS = GLU ? 2 : 1;
    sa_a = as + (long long)(it.row0 + it.r0 + min(ra, it.rows - 1)) * KB;
    sa_b = as + (long long)(it.row0 + it.r0 + min(rb, it.rows - 1)) * KB;
    sw_gate = S + ((long long)it.e * MATS * NB + it.f0 / QBLOCK) * KB;
    sw_up = sw_gate + (long long)NB * KB;  // GLU only
  }

  __device__ __forceinline__ WgScales at(int kt) const {
    WgScales sc;
    sc.a = sa_a[kt];
    sc.b = sa_b[kt];
    sc.gate = sw_gate[kt];
    sc.up = GLU ? sw_up[kt] : sc.gate;
    return sc;
  }
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// One stage of a warpgroup's 64 rows: four m64n128k32 from the stage at st (the warpgroup's
// rows at a_base, the weight tile at b_base), the partial sum promoted into total after every
// WG_PROMOTE k's (GLU) or 128 (else), scaled by the row's and the weight block's scales (g:
// gate or the only matrix, u: up; a: row ra, b: row rb). Ends with every wgmma complete.
template <bool GLU>
__device__ __forceinline__ void wg_mma_stage(float (&part)[64], float (&total)[64],
                                             unsigned a_base, unsigned b_base, float ga,
                                             float gb, float ua, float ub) {
  constexpr int STEPS = (GLU ? WG_PROMOTE : 128) / 32;  // wgmma k-steps per partial
#pragma unroll
  for (int k = 0; k < WG_BK / 32; ++k) {
    if (k % STEPS == 0) {
      fence_registers(part);
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    }
    wgmma_m64n128k32(part, wgmma_desc(a_base + 32 * k), wgmma_desc(b_base + 32 * k),
                     k % STEPS != 0);
    if (k % STEPS == STEPS - 1) {
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
      fence_registers(part);
      // accumulator i: row ra (i % 4 < 2) or rb, column 8 (i / 4) + 2 (lane % 4) + i % 2
      // (GLU: columns 64 and up are the up rows)
#pragma unroll
      for (int i = 0; i < 64; ++i) {
        const bool up = GLU && i >= 32, row_b = (i % 4) >= 2;
        total[i] = fmaf(part[i], up ? (row_b ? ub : ua) : (row_b ? gb : ga), total[i]);
      }
    }
  }
}

// A warpgroup's rows ra and rb (if inside the tile) of the item's output from its fp32 totals:
// h = silu(g) * u with g and u rounded to TX first (GLU), else the sums, as TOUT.
template <typename TX, typename TOUT, bool GLU>
__device__ __forceinline__ void wg_store(const float (&total)[64], const WgItem& it, int ra,
                                         int rb, int N, TOUT* __restrict__ out) {
  constexpr int FEAT = GLU ? WG_BN / 2 : WG_BN;
  const int q2 = 2 * (threadIdx.x % 4);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = h ? rb : ra;
    if (r >= it.rows) continue;
    TOUT* orow = out + (long long)(it.row0 + it.r0 + r) * N + it.f0;
#pragma unroll
    for (int c = 0; c < FEAT / 8; ++c) {
      const int j = 8 * c + q2;
      float v0 = total[4 * c + 2 * h], v1 = total[4 * c + 2 * h + 1];
      if (GLU) {
        v0 = swiglu_rounded<TX>(v0, total[32 + 4 * c + 2 * h]);
        v1 = swiglu_rounded<TX>(v1, total[32 + 4 * c + 2 * h + 1]);
      }
      if (it.f0 + j < N) orow[j] = from_f32<TOUT>(v0);
      if (it.f0 + j + 1 < N) orow[j + 1] = from_f32<TOUT>(v1);
    }
  }
}

// The tiles of R expert rows as wgmma's N (ROWS_N), for experts with few rows: the weight tile's
// 128 rows are the M of two m64 wgmmas (half 0: its rows 0-63, gate or features f0..f0+63;
// half 1: rows 64-127, up or f0+64..f0+127), the row tile their N. Against 64-row tiles a
// fraction of the tensor-core work and of the accumulators: the waits for each 32-k partial
// (GEMM 1) are short. Accumulator i of a half: its feature 16 warp + lane / 4 + 8 (i % 4 >= 2),
// tile row (column) 8 (i / 4) + 2 (lane % 4) + i % 2, whose scale is sa[2 (i / 4) + i % 2].
// One stage: four k-steps of 32, the partials promoted after every WG_PROMOTE k's (GLU) or 128,
// scaled by sw[half] * sa[column]. Ends with every wgmma complete.
template <bool GLU, int R>
__device__ __forceinline__ void wg_mma_stage_rows_n(float (&part)[2][R / 2],
                                                    float (&total)[2][R / 2], unsigned w_base,
                                                    unsigned r_base, const float (&sw)[2],
                                                    const float (&sa)[R / 4]) {
  constexpr int STEPS = (GLU ? WG_PROMOTE : 128) / 32;
#pragma unroll
  for (int k = 0; k < WG_BK / 32; ++k) {
    if (k % STEPS == 0) {
      fence_registers(part[0]);
      fence_registers(part[1]);
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    }
    const unsigned long long rows = wgmma_desc(r_base + 32 * k);
    wgmma_m64k32(part[0], wgmma_desc(w_base + 32 * k), rows, k % STEPS != 0);
    wgmma_m64k32(part[1], wgmma_desc(w_base + 64 * WG_BK + 32 * k), rows, k % STEPS != 0);
    if (k % STEPS == STEPS - 1) {
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
      fence_registers(part[0]);
      fence_registers(part[1]);
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < R / 2; ++i)
          total[h][i] = fmaf(part[h][i], sa[2 * (i / 4) + i % 2] * sw[h], total[h][i]);
    }
  }
}

// The item's output from the totals of wg_mma_stage_rows_n, rows and features inside it only:
// GLU h = silu(g) * u (g: half 0, u: half 1, rounded to TX first) at features f0 + m; else the
// sums, half 0 at features f0 + m, half 1 at f0 + 64 + m, as TOUT.
template <typename TX, typename TOUT, bool GLU, int R>
__device__ __forceinline__ void wg_store_rows_n(const float (&total)[2][R / 2], const WgItem& it,
                                                int N, TOUT* __restrict__ out) {
  const int m0 = (threadIdx.x % 128) / 32 * 16 + (threadIdx.x % 32) / 4;
  const int q2 = 2 * (threadIdx.x % 4);
#pragma unroll
  for (int i = 0; i < R / 2; ++i) {
    const int n = 8 * (i / 4) + q2 + i % 2, f = it.f0 + m0 + 8 * ((i % 4) / 2);
    if (n >= it.rows) continue;
    TOUT* orow = out + (long long)(it.row0 + it.r0 + n) * N;
    if (GLU) {
      if (f < N) orow[f] = from_f32<TOUT>(swiglu_rounded<TX>(total[0][i], total[1][i]));
    } else {
      if (f < N) orow[f] = from_f32<TOUT>(total[0][i]);
      if (f + 64 < N) orow[f + 64] = from_f32<TOUT>(total[1][i]);
    }
  }
}
#endif

// The grouped GEMM of one pass over every active expert, Y_e = A_e W_e^T:
//   aq: (rows, Kd) e4m3 bytes in expert order (offsets), as: (rows, ceil(Kd/128)) fp32
//   (quantize_rows, K-major); W: (E, MATS * N, Kd) bytes; S: (E, MATS * ceil(N/128),
//   ceil(Kd/128)) fp32 (docs/spec.md); tile_start from wgmma_tile_plan.
//   GLU: the tile's weight rows are features [64 c, 64 c + 64) of gate and of up, and out gets
//   h = silu(g) * u (TOUT = float), g and u rounded to TX first; else features
//   [128 c, 128 c + 128), out in TOUT. Kd % 16 == 0, aq and W 16-byte aligned; any N.
// A persistent grid takes work items round-robin (wg_item). Each stage holds the tile's WG_BM
// rows' and the 128 weight rows' next 128 k-bytes (WgCopier), WG_STAGES deep, copied by every
// thread between block barriers or, with WG_PRODUCER, by the last warpgroup alone and handed
// over by mbarriers. Warpgroup w < WG_GROUPS multiplies rows [64 w, 64 w + 64) of the tile with
// the weight tile (wg_mma_stage).
// ROWS_N (16 or 32; WG_GROUPS 1 with WG_PRODUCER only; 0: off): tiles of ROWS_N expert rows as
// wgmma's N and the weight tile as its M (wg_mma_stage_rows_n), for experts with few rows;
// tile_start then counts tiles of ROWS_N rows.
template <typename TX, typename TOUT, bool GLU, int ROWS_N>
__global__ void __launch_bounds__(WG_THREADS, WG_BLOCKS_PER_SM)
grouped_wgmma_fp8(const unsigned char* __restrict__ aq, const float* __restrict__ as,
                  const int* __restrict__ offsets, const int* __restrict__ active,
                  const int* __restrict__ tile_start, const unsigned char* __restrict__ W,
                  const float* __restrict__ S, int N, int Kd, TOUT* __restrict__ out) {
  wait_for_prior_grid();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char wg_smem_raw[];
  // the swizzle pattern repeats every 1024 bytes from a 1024-byte aligned address
  unsigned char* smem = wg_smem_raw + ((1024 - smem_address(wg_smem_raw) % 1024) % 1024);
  constexpr int FEAT = GLU ? WG_BN / 2 : WG_BN;
  constexpr int BM = ROWS_N ? ROWS_N : WG_BM;  // expert rows per tile
  static_assert(ROWS_N == 0 || ((ROWS_N == 16 || ROWS_N == 32) && WG_GROUPS == 1 && WG_PRODUCER),
                "ROWS_N: 16 or 32, with one multiplying warpgroup and the producer");
  const int warpgroup = threadIdx.x / 128, wthread = threadIdx.x % 128;
  const int lane = threadIdx.x % 32, warp_in_group = wthread / 32;
  const int chunks = (N + FEAT - 1) / FEAT;
  const int NB = (N + QBLOCK - 1) / QBLOCK, KB = (Kd + QBLOCK - 1) / QBLOCK;
  const int nk = (Kd + WG_BK - 1) / WG_BK;
  const int slots = active[0];
  const long long items = (long long)tile_start[slots] * chunks;

#if WG_PRODUCER
  // The last warpgroup copies, the others multiply; stage s is handed over by full[s] (the
  // producer's 128 threads' copies landed) and back by empty[s] (the consumers' 4 WG_GROUPS
  // warps are done reading it). Both sides walk the same items and count the stages they
  // pass (use): use u is stage u % WG_STAGES, phase u / WG_STAGES of its barriers.
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + WG_STAGES * WG_STAGE);
  unsigned long long* empty = full + WG_STAGES;
  if (threadIdx.x == 0) {
    for (int s = 0; s < WG_STAGES; ++s) {
      mbar_init(full + s, 128);
      mbar_init(empty + s, 4 * WG_GROUPS);
    }
  }
  __syncthreads();
  unsigned use = 0;
  if (warpgroup == WG_GROUPS) {
    // registers to the consumers (WG_PRODUCER_REGS)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(WG_PRODUCER_REGS));
    for (long long item = blockIdx.x; item < items; item += gridDim.x) {
      const WgItem it = wg_item<FEAT, BM>(item, chunks, slots, offsets, active, tile_start);
      const WgCopier<GLU, 128> copier(wthread, it, aq, W, N, Kd);
      for (int kt = 0; kt < nk; ++kt, ++use) {
        const int s = use % WG_STAGES;
        if (use >= WG_STAGES) mbar_wait(empty + s, (use / WG_STAGES - 1) & 1);
        copier.issue(smem + s * WG_STAGE, kt, Kd);
        cp_async_mbar_arrive(full + s);
      }
    }
    cp_async_wait<0>();
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(WG_CONSUMER_REGS));
  if constexpr (ROWS_N > 0) {
    constexpr int MATS = GLU ? 2 : 1;
    const int q2 = 2 * (lane % 4);
    for (long long item = blockIdx.x; item < items; item += gridDim.x) {
      const WgItem it = wg_item<FEAT, BM>(item, chunks, slots, offsets, active, tile_start);
      float total[2][ROWS_N / 2], part[2][ROWS_N / 2];
#pragma unroll
      for (int i = 0; i < ROWS_N / 2; ++i)
        total[0][i] = total[1][i] = part[0][i] = part[1][i] = 0.f;
      // the scales of this thread's tile rows 8 (j / 2) + q2 + j % 2 (clamped into the tile:
      // rows past it are computed, never stored) and of the weight tile's halves, a stage ahead
      const float* sa_rows = as + (long long)(it.row0 + it.r0) * KB;
      const float* sw0 = S + ((long long)it.e * MATS * NB + it.f0 / QBLOCK) * KB;
      const float* sw1 = GLU ? sw0 + (long long)NB * KB : sw0;
      float sa[ROWS_N / 4], sa_next[ROWS_N / 4], sw[2], sw_next[2];
#pragma unroll
      for (int j = 0; j < ROWS_N / 4; ++j)
        sa[j] = sa_rows[(long long)min(8 * (j / 2) + q2 + j % 2, it.rows - 1) * KB];
      sw[0] = sw0[0];
      sw[1] = sw1[0];
      for (int kt = 0; kt < nk; ++kt, ++use) {
        const int s = use % WG_STAGES, kn = min(kt + 1, nk - 1);
#pragma unroll
        for (int j = 0; j < ROWS_N / 4; ++j)
          sa_next[j] = sa_rows[(long long)min(8 * (j / 2) + q2 + j % 2, it.rows - 1) * KB + kn];
        sw_next[0] = sw0[kn];
        sw_next[1] = sw1[kn];
        mbar_wait(full + s, (use / WG_STAGES) & 1);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // copies -> wgmma
        const unsigned st = smem_address(smem + s * WG_STAGE);
        wg_mma_stage_rows_n<GLU, ROWS_N>(part, total, st + WG_A_TILE, st, sw, sa);
#pragma unroll
        for (int j = 0; j < ROWS_N / 4; ++j) sa[j] = sa_next[j];
        sw[0] = sw_next[0];
        sw[1] = sw_next[1];
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + s);  // this warp's wgmmas are complete
      }
      wg_store_rows_n<TX, TOUT, GLU, ROWS_N>(total, it, N, out);
    }
  } else {
    for (long long item = blockIdx.x; item < items; item += gridDim.x) {
      const WgItem it = wg_item<FEAT, BM>(item, chunks, slots, offsets, active, tile_start);
      const bool busy = warpgroup * 64 < it.rows;
      float total[64], part[64];
#pragma unroll
      for (int i = 0; i < 64; ++i) total[i] = part[i] = 0.f;
      const int ra = warpgroup * 64 + warp_in_group * 16 + lane / 4, rb = ra + 8;
      const WgScaleRows<GLU> scales(it, ra, rb, as, S, NB, KB);
      WgScales sc = scales.at(0);
      for (int kt = 0; kt < nk; ++kt, ++use) {
        const int s = use % WG_STAGES;
        const WgScales next = scales.at(min(kt + 1, nk - 1));
        mbar_wait(full + s, (use / WG_STAGES) & 1);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // copies -> wgmma
        if (busy) {
          const unsigned st = smem_address(smem + s * WG_STAGE);
          wg_mma_stage<GLU>(part, total, st + warpgroup * 64 * WG_BK, st + WG_A_TILE,
                            sc.a * sc.gate, sc.b * sc.gate, sc.a * sc.up, sc.b * sc.up);
        }
        sc = next;
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + s);  // this warp's wgmmas are complete
      }
      if (busy) wg_store<TX, TOUT, GLU>(total, it, ra, rb, N, out);
    }
  }
#else
  for (long long item = blockIdx.x; item < items; item += gridDim.x) {
    const WgItem it = wg_item<FEAT, BM>(item, chunks, slots, offsets, active, tile_start);
    const WgCopier<GLU, WG_THREADS> copier(threadIdx.x, it, aq, W, N, Kd);
    // Rows of this warpgroup's 64 that hold expert rows; a warpgroup with none skips the mma.
    const bool busy = warpgroup * 64 < it.rows;
    float total[64], part[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) total[i] = part[i] = 0.f;
    // this thread's accumulator rows: 16 warp + lane / 4 (+ 8) of the warpgroup's 64
    const int ra = warpgroup * 64 + warp_in_group * 16 + lane / 4, rb = ra + 8;
    const WgScaleRows<GLU> scales(it, ra, rb, as, S, NB, KB);

#pragma unroll
    for (int s = 0; s < WG_STAGES - 1; ++s) {
      if (s < nk) copier.issue(smem + s * WG_STAGE, s, Kd);
      cp_async_commit();
    }
    WgScales sc = scales.at(0);
    for (int kt = 0; kt < nk; ++kt) {
      const WgScales next = scales.at(min(kt + 1, nk - 1));
      cp_async_wait<WG_STAGES - 2>();
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // copies -> wgmma
      __syncthreads();  // stage kt landed for all; stage kt - 1 is free to refill
      if (kt + WG_STAGES - 1 < nk)
        copier.issue(smem + ((kt + WG_STAGES - 1) % WG_STAGES) * WG_STAGE, kt + WG_STAGES - 1,
                     Kd);
      cp_async_commit();
      if (busy) {
        const unsigned st = smem_address(smem + (kt % WG_STAGES) * WG_STAGE);
        wg_mma_stage<GLU>(part, total, st + warpgroup * 64 * WG_BK, st + WG_A_TILE,
                          sc.a * sc.gate, sc.b * sc.gate, sc.a * sc.up, sc.b * sc.up);
      }
      sc = next;
    }
    cp_async_wait<0>();
    __syncthreads();  // every stage read: the next item's copies may begin
    if (busy) wg_store<TX, TOUT, GLU>(total, it, ra, rb, N, out);
  }
#endif  // WG_PRODUCER
#else
  asm volatile("trap;");  // the host launches it on compute capability 9.0 only (sm_90a)
#endif
}
