// Shared helpers for the RawKernels: fp32 conversion of the three layer dtypes and 16-byte
// vector access. Compiled by NVRTC with -std=c++17; no host code.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Programmatic dependent launch (sm_90 on): inside a CUDA-graph capture (graphs.py) a kernel is
// launched to overlap the one before it in the stream, so that its launch latency hides behind
// that kernel's last wave. Every kernel calls this first: it waits until the kernel before it
// has finished and its writes are visible, so nothing is read or written early, then lets the
// kernel after it start its blocks, which wait here in turn. Launched plainly, both return at once.
// (PTX ISA "griddepcontrol"; CUDA's cudaGridDependencySynchronize and
// cudaTriggerProgrammaticLaunchCompletion.)
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// SwiGLU's activation silu(g) * u, in fp32 (docs/spec.md step 8). silu(-inf) is its limit 0,
// not -inf / inf = NaN (a gate past -65504 in an fp16 layer's gate/up rows).
__device__ __forceinline__ float swiglu(float g, float u) {
  return (g == __int_as_float(0xff800000) ? 0.f : g / (1.f + __expf(-g))) * u;
}

// The same of fp32 GEMM results g and u first rounded to T, as the GEMM paths store gate and up
// before their activation pass: the fused paths give those paths' values.
template <typename T>
__device__ __forceinline__ float swiglu_rounded(float g, float u) {
  return swiglu(to_f32(from_f32<T>(g)), to_f32(from_f32<T>(u)));
}

// Sum of v over the 32 lanes of a warp (all lanes get it).
__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// VEC elements of T moved as one access: 16 bytes when VEC * sizeof(T) == 16.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[VEC]) {
  Vec<T, VEC> tmp = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_f32(tmp.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[VEC]) {
  Vec<T, VEC> tmp;
#pragma unroll
  for (int i = 0; i < VEC; ++i) tmp.v[i] = from_f32<T>(in[i]);
  *reinterpret_cast<Vec<T, VEC>*>(p) = tmp;
}

// The end of a pair kernel (one warp per ROWS output features of one row): each lane's
// partial sums acc[m][r] (m: gate, up for GLU) added over the warp, then lane r < ROWS writes
// feature j0 + r of out_row, if below N: swiglu_rounded<T>(gate, up) (GLU) or the sum, as O.
template <typename T, typename O, int MATS, int ROWS, bool GLU>
__device__ __forceinline__ void pair_store(float (&acc)[MATS][ROWS], int lane, int j0, int N,
                                           O* out_row) {
#pragma unroll
  for (int m = 0; m < MATS; ++m)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[m][r] = warp_sum(acc[m][r]);
  if (lane < ROWS && j0 + lane < N) {
    float v = 0.f;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r == lane) v = GLU ? swiglu_rounded<T>(acc[0][r], acc[MATS - 1][r]) : acc[0][r];
    }
    out_row[j0 + lane] = from_f32<O>(v);
  }
}
