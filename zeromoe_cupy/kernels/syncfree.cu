// The "syncfree" expert path: the experts' two GEMMs with the per-expert row counts left on the
// device, so the whole pass can be captured in a CUDA graph. A fixed grid of
// (feature chunk, active-expert slot) blocks covers the worst case; blocks past the number of
// active experts exit at once. Each block streams its slice of one expert's weights through
// shared memory (16-byte cp.async, SF_STAGES deep) and multiplies it with that expert's rows,
// SF_MT rows at a time, on the tensor cores (ldmatrix + mma.sync m16n8k16, fp32 accumulate):
// in the memory-bound regime (few rows per expert) every active expert's weights are read once.
// Inline PTX only (sm_80+): NVRTC builds without <mma.h>, whose crt/ part not every CUDA
// install ships.
#include "common.cuh"
#include "async_mma.cuh"

// counts: (E,) rows per real expert -> offsets: (E+1,) their exclusive scan; cursor: (E,)
// zeroed (gather_rows claims rows with it); active: (E+1,): active[0] = number of experts with
// rows, active[1..] their ids in ascending order. One block of 1024 threads; any E.
extern "C" __global__ void syncfree_plan(const int* __restrict__ counts, int E,
                                         int* __restrict__ offsets, int* __restrict__ cursor,
                                         int* __restrict__ active) {
  wait_for_prior_grid();
  __shared__ int rows[1024], used[1024];
  const int chunk = (E + blockDim.x - 1) / blockDim.x;
  const int begin = min(E, (int)threadIdx.x * chunk), end = min(E, begin + chunk);
  int sum = 0, n = 0;
  for (int e = begin; e < end; ++e) {
    sum += counts[e];
    n += counts[e] > 0;
  }
  rows[threadIdx.x] = sum;
  used[threadIdx.x] = n;
  __syncthreads();
  for (int off = 1; off < blockDim.x; off <<= 1) {  // Hillis-Steele inclusive scans
    const int r = threadIdx.x >= off ? rows[threadIdx.x - off] : 0;
    const int u = threadIdx.x >= off ? used[threadIdx.x - off] : 0;
    __syncthreads();
    rows[threadIdx.x] += r;
    used[threadIdx.x] += u;
    __syncthreads();
  }
  int run = rows[threadIdx.x] - sum, slot = used[threadIdx.x] - n;
  for (int e = begin; e < end; ++e) {
    offsets[e] = run;
    cursor[e] = 0;
    run += counts[e];
    if (counts[e] > 0) active[1 + slot++] = e;
  }
  if (threadIdx.x == blockDim.x - 1) {
    offsets[E] = rows[threadIdx.x];
    active[0] = used[threadIdx.x];
  }
}

// Rows [n_valid[0], T) of a routing result are padding (a graph replayed for fewer tokens than
// it was captured for): their slots get id -1 and weight 0, which every expert path and the
// combine skip, and their pairs leave the per-expert counts. One thread per (row, slot).
extern "C" __global__ void mask_padding_rows(int* __restrict__ ids, float* __restrict__ weights,
                                             int* __restrict__ counts, int n_counts,
                                             const int* __restrict__ n_valid, int T, int K) {
  wait_for_prior_grid();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= T * K || i / K < n_valid[0]) return;
  const int e = ids[i];
  if (e >= 0 && e < n_counts) atomicSub(&counts[e], 1);
  ids[i] = -1;
  weights[i] = 0.f;
}

#define SF_THREADS 256
#define SF_BN 128                 // weight rows (output features) per block: 16 per warp
#define SF_MT 32                  // expert rows per pass: two 16-row mma tiles
// The pipeline's shape, set by experts/syncfree.py (-D options; the defaults here are its
// PIPELINE):
#ifndef SF_BK
#define SF_BK 64                  // reduction elements per pipeline stage
#endif
#ifndef SF_STAGES
#define SF_STAGES 3
#endif
#ifndef SF_MIN_BLOCKS
#define SF_MIN_BLOCKS 3           // blocks per SM the registers are budgeted for
#endif
#ifndef SF_PREFETCH
#define SF_PREFETCH 256           // L2 prefetch of the weight loads: 0, 64, 128 or 256 bytes
#endif
#define SF_LD (SF_BK + 8)         // shared row pitch in elements: 16 bytes of padding (banks)
#define SF_LDC (SF_BN + 4)        // pitch of the fp32 result tile
#define SF_CHUNKS (SF_BK / 8)     // 16-byte pieces per row per stage

// out[r, j] = sum_k in[r, k] * W[e, j, k] for the rows r of expert e's block (offsets from
// syncfree_plan), in: (rows, Kd) in expert order, W: (E, MATS * N, Kd), out: (rows, N).
// GLU (MATS = 2): a block takes features j in [64 x, 64 x + 64) of both the gate (rows j) and
// the up half (rows N + j) and writes silu(gate) * up, each rounded to T first like the GEMM
// path's stored values. Otherwise features [128 x, 128 x + 128). blockIdx.y: active-expert slot.
// Needs Kd % 8 == 0 and 16-byte aligned in and W (16-byte loads); any N.
// O, the output type: T, or float for fp16 layers (whose activation and expert outputs may
// pass 65504); row_scale (or null): each output row r times row_scale[r] (see
// half_rows_scaled in experts.cu).
// Shared memory: SF_STAGES stages, dynamic (syncfree_smem_bytes in experts/syncfree.py).
template <typename T, typename O, bool GLU>
__global__ void __launch_bounds__(SF_THREADS, SF_MIN_BLOCKS)
syncfree_gemm(const T* __restrict__ in, const T* __restrict__ W, O* __restrict__ out,
              const int* __restrict__ offsets, const int* __restrict__ active, int N, int Kd,
              const float* __restrict__ row_scale) {
  wait_for_prior_grid();
  const int slot = blockIdx.y;
  if (slot >= active[0]) return;
  const int e = active[1 + slot];
  const int row0 = offsets[e], m = offsets[e + 1] - row0;
  constexpr int FEAT = GLU ? SF_BN / 2 : SF_BN;
  const int f0 = blockIdx.x * FEAT;
  if (f0 >= N) return;
  constexpr int MATS = GLU ? 2 : 1;
  const T* w_e = W + (long long)e * MATS * N * Kd;
  constexpr int STAGE = (SF_BN + SF_MT) * SF_LD;  // elements: weight tile, then row tile
  extern __shared__ __align__(128) unsigned char smem_raw[];  // max(stages, result tile)
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nk = (Kd + SF_BK - 1) / SF_BK;

  for (int r0 = 0; r0 < m; r0 += SF_MT) {
    const bool two = r0 + 16 < m;  // the second 16-row tile holds rows
    // One stage: SF_BN weight rows and SF_MT expert rows, SF_BK elements each.
    auto issue = [&](int kt) {
      T* st = smem + (kt % SF_STAGES) * STAGE;
      const int k0 = kt * SF_BK;
      for (int i = threadIdx.x; i < (SF_BN + SF_MT) * SF_CHUNKS; i += SF_THREADS) {
        const int r = i / SF_CHUNKS, k = k0 + (i % SF_CHUNKS) * 8;
        const T* src;
        bool ok = k < Kd;
        if (r < SF_BN) {
          const int f = f0 + (GLU ? r % FEAT : r);
          ok = ok && f < N;
          src = w_e + ((long long)(GLU && r >= FEAT ? N + f : f)) * Kd + k;
        } else {
          ok = ok && r0 + r - SF_BN < m;
          src = in + (long long)(row0 + r0 + r - SF_BN) * Kd + k;
        }
        if (r < SF_BN)
          cp_async16<SF_PREFETCH>(st + r * SF_LD + (i % SF_CHUNKS) * 8, ok ? src : (const T*)W,
                                  ok);
        else
          cp_async16<0>(st + r * SF_LD + (i % SF_CHUNKS) * 8, ok ? src : (const T*)W, ok);
      }
    };
    // acc[m][n]: rows 16 m.. of the pass x this warp's features 16 warp + 8 n..
    float acc[2][2][4] = {};
#pragma unroll
    for (int s = 0; s < SF_STAGES - 1; ++s) {
      if (s < nk) issue(s);
      cp_async_commit();
    }
    for (int kt = 0; kt < nk; ++kt) {
      cp_async_wait<SF_STAGES - 2>();
      __syncthreads();  // stage kt landed for all; stage kt - 1 is free to refill
      if (kt + SF_STAGES - 1 < nk) issue(kt + SF_STAGES - 1);
      cp_async_commit();
      const T* st = smem + (kt % SF_STAGES) * STAGE;
#pragma unroll
      for (int kk = 0; kk < SF_BK; kk += 16) {
        // b: tiles (features 0-7, k 0-7), (0-7, k 8-15), (8-15, k 0-7), (8-15, k 8-15) of the
        // warp's 16 weight rows: b[0], b[1] feed features 0-7 and b[2], b[3] features 8-15.
        unsigned b[4], a[4];
        ldmatrix_x4(b, st + (warp * 16 + lane % 8 + (lane / 16) * 8) * SF_LD + kk +
                           ((lane / 8) % 2) * 8);
        // a: rows 0-7 / 8-15 by lane % 16, k 0-7 / 8-15 by lane / 16 (the A fragment order).
        ldmatrix_x4(a, st + (SF_BN + lane % 16) * SF_LD + kk + (lane / 16) * 8);
        mma16816<T>(acc[0][0], a, b[0], b[1]);
        mma16816<T>(acc[0][1], a, b[2], b[3]);
        if (two) {
          ldmatrix_x4(a, st + (SF_BN + 16 + lane % 16) * SF_LD + kk + (lane / 16) * 8);
          mma16816<T>(acc[1][0], a, b[0], b[1]);
          mma16816<T>(acc[1][1], a, b[2], b[3]);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // every stage consumed: the buffers take the fp32 result tile
    float* c = reinterpret_cast<float*>(smem_raw);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        // accumulator (row l / 4 [+ 8], columns 2 (l % 4) + 0, 1) of the 16x8 tile
        float* p = c + (mt * 16 + lane / 4) * SF_LDC + warp * 16 + nt * 8 + (lane % 4) * 2;
        p[0] = acc[mt][nt][0];
        p[1] = acc[mt][nt][1];
        p[8 * SF_LDC] = acc[mt][nt][2];
        p[8 * SF_LDC + 1] = acc[mt][nt][3];
      }
    __syncthreads();
    const int rows = min(SF_MT, m - r0);
    for (int i = threadIdx.x; i < rows * FEAT; i += SF_THREADS) {
      const int r = i / FEAT, j = i % FEAT;
      if (f0 + j >= N) continue;
      float v = c[r * SF_LDC + j];
      if (GLU) v = swiglu_rounded<T>(v, c[r * SF_LDC + FEAT + j]);
      if (row_scale != nullptr) v *= row_scale[row0 + r0 + r];
      out[(long long)(row0 + r0 + r) * N + f0 + j] = from_f32<O>(v);
    }
    __syncthreads();  // the result tile is read before the next pass refills the stages
  }
}

// syncfree_gemm's product with the weights streamed straight from global memory (no shared
// memory, no block synchronization), for experts of a few rows: each warp takes 16 weight rows
// (of each of MATS matrices) of one active expert as mma.sync m16n8k16's A, read 16 bytes per
// lane with a 256-byte L2 prefetch, and the expert's rows as B's columns, 8 per n-tile and NT
// tiles per pass (an expert of more rows makes more passes, reading its weights again, mostly
// from L2). Lane (g, q) = (lane / 4, lane % 4) loads elements [8 q, 8 q + 8) of each 32-element
// step of weight rows g, g + 8 and of the expert's row 8 t + g: words 0, 1 feed one mma (A's
// k = 2q.., 8 + 2q.. and B's alike), words 2, 3 the next. Which k a register stands for depends
// on q only, for A and B alike: a permutation of the step's k's, which leaves every dot product
// unchanged. fp32 accumulation. Grid: (ceil(N / (16 SF_STREAM_WARPS)), slots); arguments,
// outputs and needs (Kd % 8 == 0, 16-byte aligned rows) as syncfree_gemm.
#define SF_STREAM_WARPS 4
template <typename T, typename O, bool GLU, int NT>
__global__ void __launch_bounds__(SF_STREAM_WARPS * 32)
syncfree_stream(const T* __restrict__ in, const T* __restrict__ W, O* __restrict__ out,
                const int* __restrict__ offsets, const int* __restrict__ active, int N, int Kd,
                const float* __restrict__ row_scale) {
  wait_for_prior_grid();
  const int slot = blockIdx.y;
  if (slot >= active[0]) return;
  const int e = active[1 + slot];
  const int row0 = offsets[e], m = offsets[e + 1] - row0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int j0 = (blockIdx.x * SF_STREAM_WARPS + warp) * 16;
  if (j0 >= N) return;
  constexpr int MATS = GLU ? 2 : 1;
  const T* w[MATS][2];
  stream_weight_rows<T, MATS>(W, e, N, Kd, j0, j0, g, q, w);
  constexpr int STEP = 32;  // elements per 64-byte step
  for (int r0 = 0; r0 < m; r0 += 8 * NT) {
    const T* a[NT];  // this lane's B column of tile t: the expert's row r0 + 8 t + g
    bool has[NT];
    stream_expert_rows<T, NT>(in, row0, m, r0, Kd, g, q, a, has);
    float acc[MATS][NT][4] = {};  // C: weight rows g, g + 8 x the tile's rows 2q, 2q + 1
    StreamStep<MATS, NT> ring[STREAM_DEPTH];  // steps c .. c + STREAM_DEPTH - 1 in flight
#pragma unroll
    for (int s = 0; s < STREAM_DEPTH; ++s)
      stream_load<T, MATS, NT>(ring[s], w, a, has, s * STEP, Kd, q);
    for (int c = 0; c < Kd; c += STREAM_DEPTH * STEP) {
#pragma unroll
      for (int s = 0; s < STREAM_DEPTH; ++s) {
        const StreamStep<MATS, NT>& st = ring[s];
        if (c + s * STEP < Kd) {  // (warp-uniform) past Kd: nothing to add
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            if (r0 + 8 * t >= m) break;  // tiles past the expert's rows: none
#pragma unroll
            for (int mat = 0; mat < MATS; ++mat) {
              const unsigned a0[4] = {st.lo[mat].x, st.hi[mat].x, st.lo[mat].y, st.hi[mat].y};
              const unsigned a1[4] = {st.lo[mat].z, st.hi[mat].z, st.lo[mat].w, st.hi[mat].w};
              mma16816<T>(acc[mat][t], a0, st.b[t].x, st.b[t].y);
              mma16816<T>(acc[mat][t], a1, st.b[t].z, st.b[t].w);
            }
          }
        }
        stream_load<T, MATS, NT>(ring[s], w, a, has, c + (s + STREAM_DEPTH) * STEP, Kd, q);
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int j = j0 + g + 8 * (i / 2), r = r0 + 8 * t + 2 * q + i % 2;
        if (j < N && r < m) {
          float v = GLU ? swiglu_rounded<T>(acc[0][t][i], acc[MATS - 1][t][i]) : acc[0][t][i];
          if (row_scale != nullptr) v *= row_scale[row0 + r];
          out[(long long)(row0 + r) * N + j] = from_f32<O>(v);
        }
      }
    }
  }
}
