"""Top-k routing (SPEC.md steps 1-7): NumPy on the CPU, one Numba CUDA kernel on CuPy arrays.

Shapes: logits (T, N) fp32 with N = E + Z; ids (T, K) int32; weights (T, K) fp32; counts (N,) int32.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ._arrays import as_array, cupy_module, is_cupy

# Sizes the GPU kernel handles: each warp keeps one token's N scores in shared memory.
MAX_ROUTED_EXPERTS = 1024
MAX_TOP_K = 32
_WARPS_PER_BLOCK = 4
_SCORING_CODES = {"softmax": 0, "sigmoid": 1}


class RoutingResult(NamedTuple):
    """What the router chose. ids descend by selection score; weights are unbiased."""

    topk_ids: Any       # int32 [T, K]
    topk_weights: Any   # float32 [T, K], after renormalize and routed scaling
    expert_counts: Any  # int32 [E+Z]: (token, slot) pairs per expert


# x: (T, H) any float dtype; router_weight: (N, H); router_bias: (N,) -> (T, N) fp32
def router_logits(x, router_weight, router_bias=None):
    """L = fp32(x) @ Wr^T (+ br), in fp32 (no TF32)."""
    x32 = x.astype(np.float32, copy=False)
    logits = x32 @ router_weight.astype(np.float32, copy=False).T
    if router_bias is not None:
        logits += router_bias.astype(np.float32, copy=False)
    return logits


def check_route_args(logits, top_k, scoring_func, correction_bias, num_expert_group, topk_group):
    """Host-side validation shared by both paths; raises ValueError/TypeError."""
    if logits.ndim != 2:
        raise ValueError(f"router_logits: expected a 2-D array [T, E+Z], got shape {logits.shape}")
    if logits.dtype != np.float32:
        raise TypeError(f"router_logits: expected float32, got {logits.dtype}")
    n = logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 < top_k <= n:
        raise ValueError(f"top_k: expected an int in [1, {n}], got {top_k!r}")
    if scoring_func not in _SCORING_CODES:
        raise ValueError(f"scoring_func: expected 'softmax' or 'sigmoid', got {scoring_func!r}")
    if correction_bias is not None:
        if correction_bias.shape != (n,):
            raise ValueError(f"e_score_correction_bias: expected shape ({n},), "
                             f"got {correction_bias.shape}")
        if is_cupy(correction_bias) != is_cupy(logits):
            raise TypeError("e_score_correction_bias: expected the same array kind as the "
                            "logits (NumPy or CuPy)")
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError("num_expert_group and topk_group: expected both or neither")
    if num_expert_group is not None:
        if num_expert_group <= 0 or n % num_expert_group:
            raise ValueError(f"num_expert_group: expected a positive divisor of {n}, "
                             f"got {num_expert_group}")
        if not 0 < topk_group <= num_expert_group:
            raise ValueError(f"topk_group: expected in [1, {num_expert_group}], got {topk_group}")
        if top_k > topk_group * (n // num_expert_group):
            raise ValueError(f"top_k: expected <= topk_group * group size = "
                             f"{topk_group * (n // num_expert_group)}, got {top_k}")


def route(router_logits, top_k: int, *, scoring_func: str = "softmax",
          e_score_correction_bias=None, renormalize: bool = False,
          routed_scaling_factor: float = 1.0, num_expert_group: int | None = None,
          topk_group: int | None = None) -> RoutingResult:
    """Choose K experts per token: ids = topk(score + bias), w = score[ids] (renormalized) * rsf.

    NumPy logits run on the CPU; CuPy logits run the CUDA kernel on CuPy's current stream.
    Inputs are never modified.
    """
    logits = as_array(router_logits, "router_logits")
    bias = as_array(e_score_correction_bias, "e_score_correction_bias", allow_none=True)
    if bias is not None and bias.dtype != np.float32:
        bias = bias.astype(np.float32)
    check_route_args(logits, top_k, scoring_func, bias, num_expert_group, topk_group)
    args = (logits, int(top_k), scoring_func, bias, bool(renormalize),
            float(routed_scaling_factor), num_expert_group, topk_group)
    if is_cupy(logits):
        return _route_gpu(*args)
    return _route_numpy(*args)


def _route_numpy(logits, top_k, scoring_func, bias, renormalize, rsf, groups, topk_group):
    T, n = logits.shape
    with np.errstate(all="ignore"):
        if scoring_func == "softmax":
            m = np.max(logits, axis=1, keepdims=True) if n else logits
            e = np.exp(logits - m)
            p = e / np.sum(e, axis=1, keepdims=True)
        else:
            p = 1.0 / (1.0 + np.exp(-logits))
    p = p.astype(np.float32, copy=False)
    s = p + bias[None, :] if bias is not None else p
    key = np.where(np.isnan(s), -np.inf, s)  # NaN ranks with -inf, below every finite score
    if groups is not None:
        gs = n // groups
        best = min(2 if bias is not None else 1, gs)
        gkey = key.reshape(T, groups, gs)
        gscore = np.sort(gkey, axis=2)[:, :, gs - best:].sum(axis=2)
        keep = np.argsort(-gscore, axis=1, kind="stable")[:, :topk_group]
        allowed = np.zeros((T, groups), bool)
        np.put_along_axis(allowed, keep, True, axis=1)
        key = np.where(np.repeat(allowed, gs, axis=1), key, np.nan)  # NaN sorts after -inf
    ids = np.argsort(-key, axis=1, kind="stable")[:, :top_k].astype(np.int32)
    w = np.take_along_axis(p, ids, axis=1)
    if renormalize:
        with np.errstate(all="ignore"):
            w = w / np.sum(w, axis=1, keepdims=True)
    w = (w * np.float32(rsf)).astype(np.float32)
    counts = np.bincount(ids.ravel(), minlength=n).astype(np.int32)
    return RoutingResult(ids, w, counts)


# ----------------------------------------------------------------------------------------------
# The CUDA kernel. One warp routes one token: its N scores sit in shared memory, each lane
# owns experts lane, lane+32, ...; K rounds of a warp arg-max pick the ids in order. The same
# body runs under Numba's CUDA simulator with block-wide reductions in place of warp shuffles.

def _make_route_kernel(simulator: bool):
    from numba import cuda, float32, int32

    FULL = 0xFFFFFFFF
    WARPS = _WARPS_PER_BLOCK
    NEG_INF = float32(-math.inf)
    NAN = float32(math.nan)

    if simulator:
        @cuda.jit(device=True)
        def reduce_max(v, w, lane, fs, js):
            cuda.syncthreads()
            fs[w, lane] = v
            cuda.syncthreads()
            best = fs[w, 0]
            for j in range(1, 32):
                if fs[w, j] > best:
                    best = fs[w, j]
            cuda.syncthreads()
            return best

        @cuda.jit(device=True)
        def reduce_sum(v, w, lane, fs, js):
            cuda.syncthreads()
            fs[w, lane] = v
            cuda.syncthreads()
            total = float32(0)
            for j in range(32):
                total += fs[w, j]
            cuda.syncthreads()
            return total

        @cuda.jit(device=True)
        def reduce_argmax(v, i, w, lane, fs, js):
            cuda.syncthreads()
            fs[w, lane] = v
            js[w, lane] = i
            cuda.syncthreads()
            bv = fs[w, 0]
            bi = js[w, 0]
            for j in range(1, 32):
                ov = fs[w, j]
                oi = js[w, j]
                if ov > bv or (ov == bv and oi < bi):
                    bv = ov
                    bi = oi
            cuda.syncthreads()
            return bv, bi

        @cuda.jit(device=True)
        def sync_warp():
            cuda.syncthreads()
    else:
        @cuda.jit(device=True)
        def reduce_max(v, w, lane, fs, js):
            off = 16
            while off > 0:
                o = cuda.shfl_xor_sync(FULL, v, off)
                if o > v:
                    v = o
                off //= 2
            return v

        @cuda.jit(device=True)
        def reduce_sum(v, w, lane, fs, js):
            off = 16
            while off > 0:
                v += cuda.shfl_xor_sync(FULL, v, off)
                off //= 2
            return v

        @cuda.jit(device=True)
        def reduce_argmax(v, i, w, lane, fs, js):
            off = 16
            while off > 0:
                ov = cuda.shfl_xor_sync(FULL, v, off)
                oi = cuda.shfl_xor_sync(FULL, i, off)
                if ov > v or (ov == v and oi < i):
                    v = ov
                    i = oi
                off //= 2
            return v, i

        @cuda.jit(device=True)
        def sync_warp():
            cuda.syncwarp(FULL)

    @cuda.jit(device=True)
    def lane_best(key, w, lane, n):
        # Best (key, id) among this lane's experts; removed/masked entries are NaN.
        bv = NEG_INF
        bi = int32(0x7FFFFFFF)
        for e in range(lane, n, 32):
            v = key[w, e]
            if v > bv or (v == bv and e < bi):
                bv = v
                bi = e
        return bv, bi

    def route_kernel(logits, bias, out_ids, out_w, counts, T, n, K, scoring, has_bias,
                     renorm, rsf, groups, topk_group):
        w = cuda.threadIdx.x // 32
        lane = cuda.threadIdx.x % 32
        t = cuda.blockIdx.x * WARPS + w
        valid = t < T
        if not valid:
            t = T - 1  # idle warps still take part in block-wide barriers (simulator)
        prob = cuda.shared.array((WARPS, MAX_ROUTED_EXPERTS), float32)
        key = cuda.shared.array((WARPS, MAX_ROUTED_EXPERTS), float32)
        fs = cuda.shared.array((WARPS, 32), float32)
        js = cuda.shared.array((WARPS, 32), int32)
        row = t * n

        # Scores p (softmax or sigmoid) into shared memory.
        if scoring == 0:
            m = NEG_INF
            for e in range(lane, n, 32):
                v = logits[row + e]
                prob[w, e] = v
                if v > m:
                    m = v
            m = reduce_max(m, w, lane, fs, js)
            total = float32(0)
            for e in range(lane, n, 32):
                ex = math.exp(prob[w, e] - m)
                prob[w, e] = ex
                total += ex
            total = reduce_sum(total, w, lane, fs, js)
            inv = float32(1) / total
            for e in range(lane, n, 32):
                prob[w, e] = prob[w, e] * inv
        else:
            for e in range(lane, n, 32):
                prob[w, e] = float32(1) / (float32(1) + math.exp(-logits[row + e]))

        # Selection keys s = p + bias; NaN ranks with -inf (NaN itself marks "not choosable").
        for e in range(lane, n, 32):
            s = prob[w, e]
            if has_bias:
                s += bias[e]
            if s != s:
                s = NEG_INF
            key[w, e] = s
        sync_warp()

        # Grouped top-k: keep the topk_group groups with the best (top-1 or top-2 sum) keys.
        if groups > 0:
            gsize = n // groups
            best = 2 if has_bias else 1
            if best > gsize:
                best = gsize
            gscore = cuda.local.array(32, float32)  # groups lane, lane+32, ...
            for j in range(32):
                gscore[j] = NAN
                g = lane + 32 * j
                if g < groups:
                    a = NEG_INF
                    b = NEG_INF
                    for e in range(g * gsize, (g + 1) * gsize):
                        v = key[w, e]
                        if v > a:
                            b = a
                            a = v
                        elif v > b:
                            b = v
                    gscore[j] = a + b if best == 2 else a
            chosen = int32(0)  # bit j: group lane + 32 j is kept
            for r in range(topk_group):
                bv = NEG_INF
                bi = int32(0x7FFFFFFF)
                for j in range(32):
                    g = lane + 32 * j
                    v = gscore[j]
                    if g < groups and (v > bv or (v == bv and g < bi)):
                        bv = v
                        bi = g
                bv, bi = reduce_argmax(bv, bi, w, lane, fs, js)
                if bi % 32 == lane:
                    gscore[bi // 32] = NAN
                    chosen |= int32(1) << (bi // 32)
            for j in range(32):
                g = lane + 32 * j
                if g < groups and not (chosen >> j) & 1:
                    for e in range(g * gsize, (g + 1) * gsize):
                        key[w, e] = NAN
            sync_warp()

        # K rounds of arg-max; only the lane that owned the winner rescans its experts.
        my_id = int32(0)
        my_p = float32(0)
        bv, bi = lane_best(key, w, lane, n)
        for r in range(K):
            wv, wi = reduce_argmax(bv, bi, w, lane, fs, js)
            if wi >= n:
                wi = 0  # unreachable when K <= choosable experts (validated on the host)
            if lane == r:
                my_id = wi
                my_p = prob[w, wi]
            if wi % 32 == lane:
                key[w, wi] = NAN
                bv, bi = lane_best(key, w, lane, n)
        if renorm:
            total = reduce_sum(my_p if lane < K else float32(0), w, lane, fs, js)
            my_p = my_p / total
        if valid and lane < K:
            out_ids[t * K + lane] = my_id
            out_w[t * K + lane] = my_p * rsf
            cuda.atomic.add(counts, my_id, 1)

    return route_kernel


def route_kernel_signature():
    from numba import float32, int32, types
    f32p, i32p = types.CPointer(float32), types.CPointer(int32)
    return (f32p, f32p, i32p, f32p, i32p, int32, int32, int32, int32, int32, int32, float32,
            int32, int32)


def _route_function():
    from ._compile import memoize_per_device, numba_kernel_as_cupy
    global _route_function_cached
    if "_route_function_cached" not in globals():
        _route_function_cached = memoize_per_device(
            lambda: numba_kernel_as_cupy(_make_route_kernel(False), route_kernel_signature()))
    return _route_function_cached()


def launch_route_kernel(kernel, logits, bias, ids, weights, counts, top_k, scoring_func,
                        renormalize, rsf, groups, topk_group, launch):
    """Launch a compiled route kernel; ``launch(kernel, grid, block, args)`` does the call."""
    T, n = logits.shape
    blocks = (T + _WARPS_PER_BLOCK - 1) // _WARPS_PER_BLOCK
    args = (logits, bias if bias is not None else logits, ids, weights, counts,
            np.int32(T), np.int32(n), np.int32(top_k), np.int32(_SCORING_CODES[scoring_func]),
            np.int32(bias is not None), np.int32(renormalize), np.float32(rsf),
            np.int32(groups or 0), np.int32(topk_group or 0))
    launch(kernel, (blocks,), (32 * _WARPS_PER_BLOCK,), args)


def _route_gpu(logits, top_k, scoring_func, bias, renormalize, rsf, groups, topk_group):
    cp = cupy_module()
    T, n = logits.shape
    if n > MAX_ROUTED_EXPERTS or top_k > MAX_TOP_K:
        raise ValueError(f"router_logits/top_k: the GPU router handles E+Z <= "
                         f"{MAX_ROUTED_EXPERTS} and top_k <= {MAX_TOP_K}, got E+Z={n}, "
                         f"top_k={top_k}")
    if groups is not None and groups > 32 * 32:
        raise ValueError(f"num_expert_group: the GPU router handles <= 1024 groups, got {groups}")
    logits = cp.ascontiguousarray(logits)
    if bias is not None:
        bias = cp.ascontiguousarray(bias)
    ids = cp.empty((T, top_k), np.int32)
    weights = cp.empty((T, top_k), np.float32)
    counts = cp.zeros((n,), np.int32)
    if T:
        launch_route_kernel(_route_function(), logits, bias, ids, weights, counts, top_k,
                            scoring_func, renormalize, rsf, groups, topk_group,
                            lambda k, grid, block, args: k(grid, block, args))
    return RoutingResult(ids, weights, counts)
