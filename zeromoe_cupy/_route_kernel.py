"""The routing kernel (SPEC.md steps 2-7) in Numba CUDA, imported only when it is needed.

One warp routes one token: its N scores sit in shared memory and lane l owns experts
l, l+32, ...; K rounds of a warp arg-max pick the ids in order, ties to the lower id.
Under Numba's CUDA simulator (no warp shuffles) the same body runs with block-wide
reductions through shared memory instead; `_SIM` picks the branch at compile time.
"""
import math

from numba import config, cuda, float32, int32

from .routing import MAX_ROUTED_EXPERTS, _WARPS_PER_BLOCK as WARPS

_SIM = bool(config.ENABLE_CUDASIM)
FULL = 0xFFFFFFFF
NEG_INF = float32(-math.inf)
NAN = float32(math.nan)
NO_ID = 0x7FFFFFFF


@cuda.jit(device=True)
def sync_warp():
    if _SIM:
        cuda.syncthreads()
    else:
        cuda.syncwarp(FULL)


@cuda.jit(device=True)
def reduce_max(v, w, lane, fs):
    if _SIM:
        cuda.syncthreads()
        fs[w, lane] = v
        cuda.syncthreads()
        best = fs[w, 0]
        for j in range(1, 32):
            if fs[w, j] > best:
                best = fs[w, j]
        cuda.syncthreads()
        return best
    off = 16
    while off > 0:
        o = cuda.shfl_xor_sync(FULL, v, off)
        if o > v:
            v = o
        off //= 2
    return v


@cuda.jit(device=True)
def reduce_sum(v, w, lane, fs):
    if _SIM:
        cuda.syncthreads()
        fs[w, lane] = v
        cuda.syncthreads()
        total = float32(0)
        for j in range(32):
            total += fs[w, j]
        cuda.syncthreads()
        return total
    off = 16
    while off > 0:
        v += cuda.shfl_xor_sync(FULL, v, off)
        off //= 2
    return v


@cuda.jit(device=True)
def reduce_argmax(v, i, w, lane, fs, js):
    # The best (value, id) of the warp; NaN values never win, ties go to the lower id.
    if _SIM:
        cuda.syncthreads()
        fs[w, lane] = v
        js[w, lane] = i
        cuda.syncthreads()
        v = fs[w, 0]
        i = js[w, 0]
        for j in range(1, 32):
            ov = fs[w, j]
            oi = js[w, j]
            if ov > v or (ov == v and oi < i):
                v = ov
                i = oi
        cuda.syncthreads()
        return v, i
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
def lane_best(key, w, lane, n):
    # Best (key, id) among this lane's experts; removed or masked entries are NaN.
    bv = NEG_INF
    bi = int32(NO_ID)
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
        m = reduce_max(m, w, lane, fs)
        total = float32(0)
        for e in range(lane, n, 32):
            ex = math.exp(prob[w, e] - m)
            prob[w, e] = ex
            total += ex
        total = reduce_sum(total, w, lane, fs)
        inv = float32(1) / total
        for e in range(lane, n, 32):
            prob[w, e] = prob[w, e] * inv
    else:
        for e in range(lane, n, 32):
            prob[w, e] = float32(1) / (float32(1) + math.exp(-logits[row + e]))

    # Selection keys s = p + bias; a NaN score ranks with -inf (NaN marks "not choosable").
    for e in range(lane, n, 32):
        s = prob[w, e]
        if has_bias:
            s += bias[e]
        if s != s:
            s = NEG_INF
        key[w, e] = s
    sync_warp()

    # Grouped top-k: keep the topk_group groups with the best (top-1, or top-2 sum) keys.
    if groups > 0:
        gsize = n // groups
        best = 2 if has_bias else 1
        if best > gsize:
            best = gsize
        gscore = cuda.local.array(32, float32)  # this lane's groups: lane, lane+32, ...
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
            bi = int32(NO_ID)
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
        total = reduce_sum(my_p if lane < K else float32(0), w, lane, fs)
        my_p = my_p / total
    if valid and lane < K:
        out_ids[t * K + lane] = my_id
        out_w[t * K + lane] = my_p * rsf
        cuda.atomic.add(counts, my_id, 1)
