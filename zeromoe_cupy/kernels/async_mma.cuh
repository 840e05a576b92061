// cp.async copies and tensor-core fragments in inline PTX (sm_80+), for the kernels that
// stream weights through shared memory (syncfree.cu, fp8.cu). Inline PTX only: NVRTC builds
// without <mma.h>, whose crt/ part not every CUDA install ships. Include after common.cuh.

__device__ __forceinline__ unsigned smem_address(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// 16 bytes global -> shared, asynchronously; valid false: nothing is read, the 16 bytes are
// zero-filled. PREFETCH 64 / 128 / 256: an L2 prefetch hint, so that the rest of that line comes
// into L2 with the 16 bytes asked for (a weight row read a stage at a time is then fetched from
// DRAM in longer runs); 0: none.
template <int PREFETCH>
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  static_assert(PREFETCH == 0 || PREFETCH == 64 || PREFETCH == 128 || PREFETCH == 256,
                "PREFETCH: 0, 64, 128 or 256 bytes");
  const unsigned dst = smem_address(smem);
  const int bytes = valid ? 16 : 0;
  if constexpr (PREFETCH == 256) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst),
                 "l"(gmem), "r"(bytes));
  } else if constexpr (PREFETCH == 128) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst),
                 "l"(gmem), "r"(bytes));
  } else if constexpr (PREFETCH == 64) {
    asm volatile("cp.async.cg.shared.global.L2::64B [%0], [%1], 16, %2;\n" ::"r"(dst),
                 "l"(gmem), "r"(bytes));
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
                 "r"(bytes));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 tiles of 16-bit elements from shared memory; lane l gives the address of row l % 8
// of tile l / 8 and receives, per tile, the two elements (row l / 4, columns 2 (l % 4) + 0, 1).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}

// c (16x8 fp32) += a (16x16, row-major) * b (16x8, column-major), PTX fragment layouts.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                         unsigned b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4],
                                                        unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const unsigned (&a)[4],
                                                 unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c (16x8 fp32) += a (16x32, row-major) * b (32x8, column-major), e4m3 operands, four per
// register (compute capability 8.9 and up; below, the kernels that call it are not launched).
__device__ __forceinline__ void mma_e4m3_16832(float (&d)[4], unsigned a0, unsigned a1,
                                               unsigned a2, unsigned a3, unsigned b0,
                                               unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  asm volatile("trap;");  // the host launches its callers from compute capability 8.9 only
#endif
}

// 16 read-only bytes with a 256-byte L2 prefetch hint: a warp reads each of its weight rows 64
// bytes at a time, which DRAM otherwise serves in short bursts. On the H200 this took the pair
// kernel at 16 tokens from 2.10 to 1.24 ms (graph replay, LongCat-Flash fp8).
__device__ __forceinline__ uint4 load16_prefetch256(const void* p) {
  uint4 v;
  asm("ld.global.nc.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// ---- Weights streamed from global memory into mma.sync (grouped_stream_fp8 and
// syncfree_stream; pair_mma_fp8 reads the same way). A warp's tile is 16 weight rows; lane
// (g, q) = (lane / 4, lane % 4) reads rows g and g + 8 at its 16 bytes (16 / sizeof(T)
// elements) of each 64-byte step, and the B operand's row (a token, or one of an expert's
// rows) at the same bytes.

// Lane (g, q)'s two weight rows of the tile at row j0 of each of the MATS matrices [N, Kd] of
// expert e in W (E, MATS * N, Kd), advanced to its bytes; rows past N read row `spare` instead
// (computed, never stored).
template <typename T, int MATS>
__device__ __forceinline__ void stream_weight_rows(const T* W, int e, int N, int Kd, int j0,
                                                   int spare, int g, int q,
                                                   const T* (&w)[MATS][2]) {
  const int jl = j0 + g < N ? j0 + g : spare, jh = j0 + g + 8 < N ? j0 + g + 8 : spare;
#pragma unroll
  for (int mat = 0; mat < MATS; ++mat) {
    const T* base = W + ((long long)e * MATS + mat) * N * Kd + (16 / sizeof(T)) * q;
    w[mat][0] = base + (long long)jl * Kd;
    w[mat][1] = base + (long long)jh * Kd;
  }
}

// 16 bytes of each of the lane's weight rows at element c (zeros where not inside: past Kd).
template <typename T, int MATS>
__device__ __forceinline__ void stream_weight_words(const T* (&w)[MATS][2], int c, bool inside,
                                                    uint4 (&lo)[MATS], uint4 (&hi)[MATS]) {
#pragma unroll
  for (int mat = 0; mat < MATS; ++mat) {
    lo[mat] = inside ? load16_prefetch256(w[mat][0] + c) : make_uint4(0, 0, 0, 0);
    hi[mat] = inside ? load16_prefetch256(w[mat][1] + c) : make_uint4(0, 0, 0, 0);
  }
}

// Lane (g, q)'s B column in each of the NT 8-row tiles from row r0 of an expert's m rows,
// which start at row row0 of in (rows of Kd): row r0 + 8 t + g, advanced to the lane's bytes;
// has[t] is false past the expert's rows (the pointer then names row row0, never read).
template <typename T, int NT>
__device__ __forceinline__ void stream_expert_rows(const T* in, int row0, int m, int r0, int Kd,
                                                   int g, int q, const T* (&a)[NT],
                                                   bool (&has)[NT]) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int r = r0 + 8 * t + g;
    has[t] = r < m;
    a[t] = in + (long long)(row0 + (has[t] ? r : 0)) * Kd + (16 / sizeof(T)) * q;
  }
}

// ---- The operands of one 64-byte step, held in registers STREAM_DEPTH steps ahead. Without
// this the compiler issued one step's loads, waited for them and ran its mma before issuing
// the next (the tile loop's early exit splits the unrolled body into branches it does not
// schedule across): about 4 x 16 bytes in flight per lane, so the kernels ran at the memory
// latency's pace and lost 10-20% of the copy rate on some cards.
#ifndef STREAM_DEPTH
#define STREAM_DEPTH 4  // steps in flight per lane (even: pair_mma_fp8 and grouped_stream_fp8
                        // consume a 128-wide k-group, two steps, at a time)
#endif
template <int MATS, int NT>
struct StreamStep {
  uint4 lo[MATS], hi[MATS];  // weight rows g and g + 8 of each matrix
  uint4 b[NT];               // the B column of each tile
};

// Step c (elements) of the lane's operands; zeros where c + the lane's offset is not below end
// (Kd, or the end of a warp's k-range): those loads are not issued.
template <typename T, int MATS, int NT>
__device__ __forceinline__ void stream_load(StreamStep<MATS, NT>& st, const T* (&w)[MATS][2],
                                            const T* (&a)[NT], const bool (&has)[NT], int c,
                                            int end, int q) {
  const bool inside = c + (16 / (int)sizeof(T)) * q < end;
  stream_weight_words<T, MATS>(w, c, inside, st.lo, st.hi);
#pragma unroll
  for (int t = 0; t < NT; ++t)
    st.b[t] = inside && has[t] ? *reinterpret_cast<const uint4*>(a[t] + c) : make_uint4(0, 0, 0, 0);
}
