// Expert parallelism (parallel/exchange.py): the per-token bookkeeping of dispatch and combine
// in three launches instead of a chain of array operations, whose host cost dominated a
// decode step. Rank p holds the real experts [p El, (p + 1) El); a slot is real when
// 0 <= id < E; ids outside that range (zero experts, -1) never leave the rank.

#include "common.cuh"

// need: (R, T) int32, need[p, t] = 1 if token t has a real slot on rank p, else 0;
// counts: (R,) int32, zeroed by the caller, gets the tokens per rank. One thread per token.
extern "C" __global__ void ep_need(const int* __restrict__ ids, int T, int K, int E, int El,
                                   int R, int* __restrict__ need, int* __restrict__ counts) {
  wait_for_prior_grid();
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  for (int p = 0; p < R; ++p) {
    int any = 0;
    for (int k = 0; k < K; ++k) {
      const int e = ids[(long long)t * K + k];
      any |= e >= 0 && e < E && e / El == p;
    }
    need[(long long)p * T + t] = any;
    if (any) atomicAdd(&counts[p], 1);
  }
}

// For every needed (p, t) (pos: the inclusive scan of need, so its row is pos - 1): the send
// row's token and rank, x's row (row_bytes bytes, copied in 16-byte pieces when vec16), the
// slot ids in rank p's numbering (-1 for slots elsewhere) and the weights. One block per
// (p, t), rank-major.
extern "C" __global__ void ep_pack(const unsigned char* __restrict__ x, long long row_bytes,
                                   int vec16, const int* __restrict__ ids,
                                   const float* __restrict__ weights,
                                   const int* __restrict__ need, const int* __restrict__ pos,
                                   int T, int K, int E, int El, unsigned char* __restrict__ send_x,
                                   int* __restrict__ send_ids, float* __restrict__ send_w,
                                   long long* __restrict__ tok, long long* __restrict__ to) {
  wait_for_prior_grid();
  const long long i = blockIdx.x;
  if (!need[i]) return;
  const int p = (int)(i / T), t = (int)(i % T);
  const long long r = pos[i] - 1;
  if (threadIdx.x == 0) {
    tok[r] = t;
    to[r] = p;
  }
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int e = ids[(long long)t * K + k];
    const bool here = e >= 0 && e < E && e / El == p;
    send_ids[r * K + k] = here ? e - p * El : -1;
    send_w[r * K + k] = weights[(long long)t * K + k];
  }
  const unsigned char* src = x + t * row_bytes;
  unsigned char* dst = send_x + r * row_bytes;
  if (vec16) {
    for (long long b = threadIdx.x * 16LL; b < row_bytes; b += blockDim.x * 16LL)
      *reinterpret_cast<uint4*>(dst + b) = *reinterpret_cast<const uint4*>(src + b);
  } else {
    for (long long b = threadIdx.x; b < row_bytes; b += blockDim.x) dst[b] = src[b];
  }
}

// The final combine's slots, (T, K + R): the token's K routed slots with their real experts
// masked (id -1: computed on their ranks), then one slot per rank p with id 0 (a real-expert
// id: its row is read), weight 1 and row pos[p, t] - 1 of the rows sent back (-1 where the
// token sent nothing to p). One thread per slot.
extern "C" __global__ void ep_combine_slots(const int* __restrict__ ids,
                                            const float* __restrict__ weights,
                                            const int* __restrict__ need,
                                            const int* __restrict__ pos, int T, int K, int E,
                                            int R, int* __restrict__ all_ids,
                                            float* __restrict__ all_w,
                                            int* __restrict__ slot_rows) {
  wait_for_prior_grid();
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const int W = K + R;
  if (i >= (long long)T * W) return;
  const int t = (int)(i / W), j = (int)(i % W);
  if (j < K) {
    const int e = ids[(long long)t * K + j];
    all_ids[i] = e < E ? -1 : e;
    all_w[i] = weights[(long long)t * K + j];
    slot_rows[i] = -1;
  } else {
    const long long q = (long long)(j - K) * T + t;
    all_ids[i] = 0;
    all_w[i] = 1.f;
    slot_rows[i] = need[q] ? pos[q] - 1 : -1;
  }
}
