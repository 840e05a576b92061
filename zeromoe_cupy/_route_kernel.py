"""The routing kernel (SPEC.md steps 2-7) in Numba CUDA, imported only when it is needed.

One warp routes one token: its N scores sit in shared memory, lane l owning experts l, l+32,
...; K rounds of a warp arg-max over each lane's best remaining expert pick the ids in order,
ties to the lower id. Each lane keeps its next few candidates sorted in registers, so the
rounds rarely touch memory.
Written for few instructions per expert (the kernel is instruction-bound): 32-bit loop
counters (Numba's range() counts in 64 bits), unsigned shared-memory indices (no negative-index
wraparound code), softmax weights kept unnormalised in shared memory and scaled on the fly, and
a branch-free insertion into the candidate cache on the first scan.
Under Numba's CUDA simulator (no warp shuffles) the same body runs with block-wide
reductions through shared memory instead; `_SIM` picks the branch at compile time.
"""
import math

from numba import config, cuda, float32, int32, uint32

from .routing import _WARPS_PER_BLOCK as WARPS

_SIM = bool(config.ENABLE_CUDASIM)
FULL = 0xFFFFFFFF
NEG_INF = float32(-math.inf)
# Selection keys are clamped to >= -FLT_MAX, so NaN (and -inf) keys rank below every finite
# one yet above an empty cache slot (-inf): the first scan can insert on a plain ">".
LOWEST = float32(-3.4028234663852886e38)
NO_ID = 0x7FFFFFFF
CACHE = 3  # candidates each lane holds between rescans


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
def warp_best(v, i, w, lane, fs, js):
    """reduce_argmax for values that are never NaN (clamped keys): a max over the values,
    then a vote for who holds it; only a tie needs the arg-min over the ids."""
    if _SIM:
        return reduce_argmax(v, i, w, lane, fs, js)
    m = max(v, cuda.shfl_xor_sync(FULL, v, 16))
    m = max(m, cuda.shfl_xor_sync(FULL, m, 8))
    m = max(m, cuda.shfl_xor_sync(FULL, m, 4))
    m = max(m, cuda.shfl_xor_sync(FULL, m, 2))
    m = max(m, cuda.shfl_xor_sync(FULL, m, 1))
    holders = cuda.ballot_sync(FULL, v == m)
    if cuda.popc(holders) == 1:  # one lane holds the best value (a warp-uniform branch)
        return m, cuda.shfl_sync(FULL, i, cuda.ffs(holders) - 1)
    b = i if v == m else int32(NO_ID)
    b = min(b, cuda.shfl_xor_sync(FULL, b, 16))
    b = min(b, cuda.shfl_xor_sync(FULL, b, 8))
    b = min(b, cuda.shfl_xor_sync(FULL, b, 4))
    b = min(b, cuda.shfl_xor_sync(FULL, b, 2))
    b = min(b, cuda.shfl_xor_sync(FULL, b, 1))
    return m, b


@cuda.jit(device=True)
def selection_key(pv, e, bias, has_bias):
    # s = p + bias, clamped to >= -FLT_MAX: NaN and -inf rank with -FLT_MAX, below every
    # finite score.
    s = pv
    if has_bias:
        s += bias[e]
    return s if s > LOWEST else LOWEST


def make_route_kernel(grouped: bool):
    """The routing kernel; only the ``grouped`` variant has the grouped top-k code."""

    def route_kernel(logits, bias, out_ids, out_w, counts, T, n, K, scoring, has_bias,
                     renorm, rsf, groups, topk_group):
        tid = int32(cuda.threadIdx.x)
        w = int32(tid >> 5)
        lane = int32(tid & 31)
        t = cuda.blockIdx.x * WARPS + w
        valid = t < T
        if not valid:
            t = T - 1  # idle warps still take part in block-wide barriers (simulator)
        fs = cuda.shared.array((WARPS, 32), float32)
        js = cuda.shared.array((WARPS, 32), int32)
        # Scores of the token: p (sigmoid) or exp(l - max) (softmax; p = that * scale). Sized
        # at launch (WARPS * n floats), so small n leaves room for more blocks per SM.
        ps = cuda.shared.array(0, float32)
        base = uint32(w * n)
        row = t * n

        if scoring == 0:
            m = NEG_INF
            e = lane
            while e < n:
                v = logits[row + e]
                ps[base + uint32(e)] = v
                m = v if v > m else m
                e = int32(e + 32)
            m = reduce_max(m, w, lane, fs)
            total = float32(0)
            e = lane
            while e < n:
                ex = math.exp(ps[base + uint32(e)] - m)
                ps[base + uint32(e)] = ex
                total += ex
                e = int32(e + 32)
            total = reduce_sum(total, w, lane, fs)
            scale = float32(1) / total
        else:
            e = lane
            while e < n:
                ps[base + uint32(e)] = float32(1) / (float32(1) + math.exp(-logits[row + e]))
                e = int32(e + 32)
            scale = float32(1)

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
                            v = selection_key(ps[base + uint32(e)] * scale, e, bias, has_bias)
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
            e = lane
            while e < n:
                g = e // gsize
                if not (kept[w, g // 32] >> (g % 32)) & 1:
                    masked |= int32(1) << j
                j += 1
                e = int32(e + 32)
        sync_warp()  # ps (and kept) written by every lane before any lane scans them

        # First scan: each lane's best CACHE candidates, sorted (key desc, id asc). Experts
        # arrive in ascending id, so a later equal key ranks after: a plain ">" inserts.
        c0v = c1v = c2v = NEG_INF  # below every clamped key: empty
        c0i = c1i = c2i = int32(NO_ID)
        choosable = int32(0)
        j = 0
        e = lane
        while e < n:
            v = selection_key(ps[base + uint32(e)] * scale, e, bias, has_bias)
            if grouped and (masked >> j) & 1:
                v = NEG_INF  # a dropped group's expert never enters the cache
            else:
                choosable += 1
            # Insert (v, e): three compares against the old entries, then selects (no chain).
            g0 = v > c0v
            g1 = v > c1v
            g2 = v > c2v
            c2v = c1v if g1 else (v if g2 else c2v)
            c2i = c1i if g1 else (e if g2 else c2i)
            c1v = c0v if g0 else (v if g1 else c1v)
            c1i = c0i if g0 else (e if g1 else c1i)
            c0v = v if g0 else c0v
            c0i = e if g0 else c0i
            j += 1
            e = int32(e + 32)
        exhausted = choosable <= CACHE  # the cache holds every choosable expert of the lane

        # K rounds of a warp arg-max over each lane's best remaining candidate. A lane whose
        # cache runs dry rescans its experts for those ranked after the last one it gave.
        my_id = int32(0)
        my_p = float32(0)
        last_v = float32(math.inf)
        last_i = int32(-1)
        for r in range(K):
            bv, bi = warp_best(c0v, c0i, w, lane, fs, js)
            if bi >= n:
                bi = 0  # unreachable when K <= choosable experts (validated on the host)
            # The lane that gave the winner pops it (selects, not a branch: one lane pops).
            win = c0i == bi
            last_v = c0v if win else last_v
            last_i = c0i if win else last_i
            c0v = c1v if win else c0v
            c1v = c2v if win else c1v
            c2v = NEG_INF if win else c2v
            c0i = c1i if win else c0i
            c1i = c2i if win else c1i
            c2i = int32(NO_ID) if win else c2i
            if win:
                if c0i == NO_ID and not exhausted:
                    remaining = int32(0)
                    j = 0
                    e = lane
                    while e < n:
                        v = selection_key(ps[base + uint32(e)] * scale, e, bias, has_bias)
                        # choosable, ranked after the last one given, and before the last held
                        if not (masked >> j) & 1 and (
                                v < last_v or (v == last_v and e > last_i)):
                            remaining += 1
                            if v > c2v:
                                c2v, c2i = v, e
                                if c2v > c1v:
                                    c1v, c2v, c1i, c2i = c2v, c1v, c2i, c1i
                                    if c1v > c0v:
                                        c0v, c1v, c0i, c1i = c1v, c0v, c1i, c0i
                        j += 1
                        e = int32(e + 32)
                    exhausted = remaining <= CACHE
            if lane == r:
                my_id = bi
                my_p = ps[base + uint32(bi)] * scale
        if renorm:
            total = reduce_sum(my_p if lane < K else float32(0), w, lane, fs)
            my_p = my_p / total
        if valid and lane < K:
            out_ids[t * K + lane] = my_id
            out_w[t * K + lane] = my_p * rsf
            cuda.atomic.add(counts, my_id, 1)

    return route_kernel
