// The bench's copy ceiling: a plain device-to-device copy in 16-byte vectors, grid-stride.
// Each thread issues four loads before their stores, so that a grid of a few blocks per SM
// keeps enough bytes in flight to saturate the memory bus.
// src, dst: n 16-byte vectors each, 16-byte aligned, not overlapping.
#include "common.cuh"

__global__ void copy_16byte(const uint4* __restrict__ src, uint4* __restrict__ dst,
                            long long n) {
  wait_for_prior_grid();
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = src[i];
    const uint4 b = src[i + stride];
    const uint4 c = src[i + 2 * stride];
    const uint4 d = src[i + 3 * stride];
    dst[i] = a;
    dst[i + stride] = b;
    dst[i + 2 * stride] = c;
    dst[i + 3 * stride] = d;
  }
  for (; i < n; i += stride) dst[i] = src[i];
}
