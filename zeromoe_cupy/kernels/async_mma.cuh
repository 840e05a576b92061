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
