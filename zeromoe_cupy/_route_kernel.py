"""The routing kernel (SPEC.md steps 2-7) in Numba CUDA, imported only when it is needed.

One warp routes one token: its N scores sit in shared memory, lane l owning experts l, l+32,
...; K rounds of a warp arg-max over each lane's best remaining expert pick the ids in order,
ties to the lower id. Each lane keeps its next few candidates sorted in registers, so the
rounds rarely touch memory.
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
CACHE = 4  # candidates each lane holds between rescans


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
def broadcast(v, src, w, lane, fs):
    # Lane src's v, for every lane of the warp.
    if _SIM:
        cuda.syncthreads()
        if lane == src:
            fs[w, 0] = v
        cuda.syncthreads()
        v = fs[w, 0]
        cuda.syncthreads()
        return v
    return cuda.shfl_sync(FULL, v, src)


@cuda.jit(device=True)
def selection_key(pv, e, bias, has_bias):
    # s = p + bias; a NaN score ranks with -inf, below every finite score.
    s = pv
    if has_bias:
        s += bias[e]
    if s != s:
        s = NEG_INF
    return s


def make_route_kernel(grouped: bool):
    """The routing kernel; only the ``grouped`` variant has the grouped top-k code."""

    def route_kernel(logits, bias, out_ids, out_w, counts, T, n, K, scoring, has_bias,
                     renorm, rsf, groups, topk_group):
        w = int32(cuda.threadIdx.x // 32)
        lane = int32(cuda.threadIdx.x % 32)
        t = cuda.blockIdx.x * WARPS + w
        valid = t < T
        if not valid:
            t = T - 1  # idle warps still take part in block-wide barriers (simulator)
        fs = cuda.shared.array((WARPS, 32), float32)
        js = cuda.shared.array((WARPS, 32), int32)
        ps = cuda.shared.array((WARPS, MAX_ROUTED_EXPERTS), float32)  # scores p of the token
        row = t * n

        # Scores p: softmax or sigmoid, into shared memory (lane l writes experts l, l+32, ...).
        if scoring == 0:
            m = NEG_INF
            for e in range(lane, n, 32):
                v = logits[row + e]
                ps[w, e] = v
                if v > m:
                    m = v
            m = reduce_max(m, w, lane, fs)
            total = float32(0)
            for e in range(lane, n, 32):
                ex = math.exp(ps[w, e] - m)
                ps[w, e] = ex
                total += ex
            total = reduce_sum(total, w, lane, fs)
            inv = float32(1) / total
            for e in range(lane, n, 32):
                ps[w, e] = ps[w, e] * inv
        else:
            for e in range(lane, n, 32):
                ps[w, e] = float32(1) / (float32(1) + math.exp(-logits[row + e]))

        masked = int32(0)  # bit j: expert lane + 32 j is in a dropped group
        if grouped:
            # Keep the topk_group groups whose best key (the best two keys' sum when a bias is
            # present) is largest; every other expert is masked.
            kept = cuda.shared.array((WARPS, 32), int32)  # bit g % 32 of word g // 32
            kept[w, lane] = 0
            sync_warp()
            gsize = n // groups
            best = 2 if has_bias else 1
            if best > gsize:
                best = gsize
            for r in range(topk_group):
                bv = NEG_INF
                bi = int32(NO_ID)
                for g in range(lane, groups, 32):
                    if not (kept[w, g // 32] >> (g % 32)) & 1:
                        a = NEG_INF
                        b = NEG_INF
                        for e in range(g * gsize, (g + 1) * gsize):
                            v = selection_key(ps[w, e], e, bias, has_bias)
                            if v > a:
                                b = a
                                a = v
                            elif v > b:
                                b = v
                        score = a + b if best == 2 else a
                        if score > bv or (score == bv and g < bi):
                            bv = score
                            bi = g
                bv, bi = reduce_argmax(bv, bi, w, lane, fs, js)
                if lane == 0 and bi < groups:
                    kept[w, bi // 32] |= int32(1) << (bi % 32)
                sync_warp()
            j = 0
            for e in range(lane, n, 32):
                g = e // gsize
                if not (kept[w, g // 32] >> (g % 32)) & 1:
                    masked |= int32(1) << j
                j += 1
        sync_warp()  # ps (and kept) written by every lane before any lane scans them

        # K rounds of a warp arg-max over each lane's best remaining expert. A lane keeps its
        # next CACHE candidates sorted in registers (ranked by key desc, id asc) and rescans
        # its experts only when they run out: those ranked after the last one it gave.
        my_id = int32(0)
        my_p = float32(0)
        last_v = float32(math.inf)
        last_i = int32(-1)
        need_fill = True
        exhausted = False
        c0v = c1v = c2v = c3v = NEG_INF
        c0i = c1i = c2i = c3i = int32(NO_ID)
        c0p = c1p = c2p = c3p = float32(0)
        for r in range(K):
            if need_fill and not exhausted:
                c0v = c1v = c2v = c3v = NEG_INF
                c0i = c1i = c2i = c3i = int32(NO_ID)
                remaining = int32(0)
                j = 0
                for e in range(lane, n, 32):
                    pv = ps[w, e]
                    v = selection_key(pv, e, bias, has_bias)
                    # choosable, ranked after the last one given ...
                    if not (masked >> j) & 1 and (v < last_v or (v == last_v and e > last_i)):
                        remaining += 1
                        if v > c3v or (v == c3v and e < c3i):  # ... and before the 4th held
                            c3v, c3i, c3p = v, e, pv
                            if c3v > c2v or (c3v == c2v and c3i < c2i):
                                c2v, c3v, c2i, c3i, c2p, c3p = c3v, c2v, c3i, c2i, c3p, c2p
                                if c2v > c1v or (c2v == c1v and c2i < c1i):
                                    c1v, c2v, c1i, c2i, c1p, c2p = c2v, c1v, c2i, c1i, c2p, c1p
                                    if c1v > c0v or (c1v == c0v and c1i < c0i):
                                        c0v, c1v, c0i, c1i, c0p, c1p = \
                                            c1v, c0v, c1i, c0i, c1p, c0p
                    j += 1
                exhausted = remaining <= CACHE
                need_fill = False
            bv, bi = reduce_argmax(c0v, c0i, w, lane, fs, js)
            if bi >= n:
                bi = 0  # unreachable when K <= choosable experts (validated on the host)
            wp = c0p
            if c0i == bi:  # this lane gave the winner: pop it
                last_v, last_i = c0v, c0i
                c0v, c1v, c2v, c3v = c1v, c2v, c3v, NEG_INF
                c0i, c1i, c2i, c3i = c1i, c2i, c3i, int32(NO_ID)
                c0p, c1p, c2p = c1p, c2p, c3p
                need_fill = c0i == NO_ID
            wp = broadcast(wp, bi % 32, w, lane, fs)
            if lane == r:
                my_id = bi
                my_p = wp
        if renorm:
            total = reduce_sum(my_p if lane < K else float32(0), w, lane, fs)
            my_p = my_p / total
        if valid and lane < K:
            out_ids[t * K + lane] = my_id
            out_w[t * K + lane] = my_p * rsf
            cuda.atomic.add(counts, my_id, 1)

    return route_kernel
