"""The routing kernel (docs/spec.md steps 2-7) in Numba CUDA, imported only when it is needed.

One warp routes one token. Lane l owns experts 4l + 128g + c (c < 4): one 16-byte load per
group g, and its scores stay in registers (the kernel is compiled per N, so the per-lane loops
have fixed trip counts and unroll). K rounds of a warp arg-max over each lane's best remaining
expert pick the ids in order, ties to the lower id. Each lane keeps its next few candidates
sorted in registers and rescans its own scores only when they run out.
Written for few instructions per expert (the kernel is instruction-bound): 32-bit indices,
softmax scores scaled on the fly, branch-free insertion into the candidate cache, a vote-based
arg-max, and the winners' weights recomputed from the logits by the lanes that write them.
Under Numba's CUDA simulator (no warp shuffles, no intrinsics) the same body runs with
block-wide reductions through shared memory and plain loads; `_SIM` picks at compile time.

The ranking rule (the NumPy path in routing.py follows it too): selection values are fp32,
s = p + bias, or without a bias the logit itself (the same order as p, and exact where p
underflows). They are compared as ints in their order (key_of), so NaN ranks below -inf and
-FLT_MAX, and padding / dropped groups below NaN. With a bias, among the experts holding one
finite key: if they all have the same bias, by the logit (their exact order: fp32 sums of
one bias tie where the scores underflowed or rounded alike), then by the lower id; otherwise
by the lower id (different biases tie exactly, or within an fp32 rounding). The fast
selection ranks by (key, id), notes when the last winner of a round ties with a remaining
key, and only then the warp redoes the token with the full rule (rare: ties of finite fp32
sums). Grouped top-k with a bias ranks groups by the fp32 sum of their two best values, except
that groups whose sum underflowed (below the smallest normal float, from experts of bias 0)
share the key TINY and, when the best remaining group holds it, are ranked by their exact
sums from the log-scores (routing._tiny_group_keys does the same on the host).
"""
import numpy as np

import math

from llvmlite import ir
from numba import config, cuda, float32, int32, types, uint32
from numba.cuda import libdevice
from numba.core.extending import intrinsic

from .routing import _WARPS_PER_BLOCK as WARPS, KEY_MASKED, KEY_NAN, KEY_SHIFT, KEY_TINY

_SIM = bool(config.ENABLE_CUDASIM)
FULL = 0xFFFFFFFF
NEG_INF = float32(-math.inf)
NO_ID = 0x7FFFFFFF
MASKED = int32(KEY_MASKED)       # padding, dropped groups, empty cache slots
NAN_KEY = int32(KEY_NAN)
NEG_INF_KEY = int32(-(2**31) + 0xFFFFFE)
POS_INF_KEY = int32(2**31 - 1)
TINY_FLOAT = float32(np.finfo(np.float32).tiny)  # the smallest normal fp32
TINY = int32(KEY_TINY)           # the groups' key where their fp32 scores underflowed


@intrinsic
def _load4(typingctx, ptr, index):
    """ptr[index : index + 4] in one 16-byte load (index * 4 bytes must be 16-aligned)."""
    ret = types.UniTuple(float32, 4)

    def codegen(context, builder, sig, args):
        vec = ir.VectorType(ir.FloatType(), 4)
        value = builder.load(builder.bitcast(builder.gep(args[0], [args[1]]), vec.as_pointer()),
                             align=16)
        return context.make_tuple(builder, ret, [
            builder.extract_element(value, ir.Constant(ir.IntType(32), k)) for k in range(4)])
    return ret(ptr, index), codegen


@intrinsic
def _count_add(typingctx, ptr, index, value):
    """atomicAdd(ptr + index, value) on a plain int32 pointer (cuda.atomic.add needs an
    array, which Numba passes as 7 kernel parameters)."""
    def codegen(context, builder, sig, args):
        builder.atomic_rmw("add", builder.gep(args[0], [args[1]]), args[2], "monotonic")
        return context.get_dummy_value()
    return types.none(ptr, index, value), codegen


@cuda.jit(device=True)
def load4(p, i):
    if _SIM:
        return p[i], p[i + 1], p[i + 2], p[i + 3]
    return _load4(p, i)


@cuda.jit(device=True)
def count_add(counts, i, value):
    if _SIM:
        cuda.atomic.add(counts, i, value)
    else:
        _count_add(counts, i, value)


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
    """reduce_argmax for int keys: a max over the values, then a vote for who holds it;
    only a tie needs the arg-min over the ids."""
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
def fmax(a, b):
    """The larger of a and b; a NaN loses to a number (one instruction on the GPU)."""
    if _SIM:
        return a if a > b or b != b else b
    return libdevice.fmaxf(a, b)


if _SIM:
    @cuda.jit(device=True)
    def key_of(f):
        """f's rank as an int32 (see the module docstring): the simulator's version."""
        f = np.float32(f)
        if f != f:
            return NAN_KEY
        bits = int(np.float32(f + np.float32(0)).view(np.int32))
        return int32(((bits ^ 0x7FFFFFFF) if bits < 0 else bits) + KEY_SHIFT)
else:
    @cuda.jit(device=True)
    def key_of(f):
        """f's rank as an int32: the bits of f, negatives' magnitude bits flipped, shifted so
        that the canonical NaN the GPU's arithmetic produces (0x7FFFFFFF) wraps to NAN_KEY,
        just below -inf; the max keeps any other NaN there too. Callers pass f fresh from an
        add (NaN canonical, -0 turned +0)."""
        bits = libdevice.float_as_int(f)
        return max(int32(int32(bits ^ ((bits >> 31) & 0x7FFFFFFF)) + KEY_SHIFT), NAN_KEY)


if _SIM:
    @cuda.jit(device=True)
    def quiet_div(a, b):
        """a / b in fp32 (inf / inf is NaN, as on the GPU; no warning)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return a / b
else:
    @cuda.jit(device=True)
    def quiet_div(a, b):
        return a / b


if _SIM:
    @cuda.jit(device=True)
    def sigmoid_fast(logit):
        """1 / (1 + exp(-l)) in fp32 (0 where exp overflows, as on the GPU; no warning)."""
        with np.errstate(over="ignore"):
            return np.float32(1) / (np.float32(1) + np.exp(-np.float32(logit)))
else:
    @cuda.jit(device=True)
    def sigmoid_fast(logit):
        return float32(1) / (float32(1) + math.exp(-logit))


@cuda.jit(device=True)
def warp_any(pred, w, lane, js):
    """Whether pred holds in any lane of the warp (all lanes get it)."""
    if _SIM:
        cuda.syncthreads()
        js[w, lane] = 1 if pred else 0
        cuda.syncthreads()
        hit = False
        for j in range(32):
            if js[w, j]:
                hit = True
        cuda.syncthreads()
        return hit
    return cuda.any_sync(FULL, pred)


@cuda.jit(device=True)
def reduce_argmax2(k, l, i, w, lane, ks_, ls_, js):
    """The warp's largest (k, l, i) by k, then l, then the lowest i."""
    if _SIM:
        cuda.syncthreads()
        ks_[w, lane] = k
        ls_[w, lane] = l
        js[w, lane] = i
        cuda.syncthreads()
        k = ks_[w, 0]
        l = ls_[w, 0]
        i = js[w, 0]
        for j in range(1, 32):
            ok, ol, oi = ks_[w, j], ls_[w, j], js[w, j]
            if ok > k or (ok == k and (ol > l or (ol == l and oi < i))):
                k, l, i = ok, ol, oi
        cuda.syncthreads()
        return k, l, i
    off = 16
    while off > 0:
        ok = cuda.shfl_xor_sync(FULL, k, off)
        ol = cuda.shfl_xor_sync(FULL, l, off)
        oi = cuda.shfl_xor_sync(FULL, i, off)
        if ok > k or (ok == k and (ol > l or (ol == l and oi < i))):
            k, l, i = ok, ol, oi
        off //= 2
    return k, l, i


def make_route_kernel(grouped: bool, n: int):
    """The routing kernel for N = n experts; only the ``grouped`` variant has the grouped
    top-k code (and uses dynamic shared memory: WARPS * n floats)."""
    G = (n + 127) // 128  # 4-expert groups per lane
    V = 4 * G             # scores per lane, in registers
    VEC = n % 4 == 0      # rows start 16-byte aligned: vector loads
    FULL = n % 128 == 0   # every lane's groups lie inside the row (no end checks)
    DOF = float32(max(n - 1, 1))  # the unbiased std's divisor

    @cuda.jit(device=True)
    def load_group(p, row, e0):
        # Experts e0 .. e0+3 of the row; -inf past the end (they never become candidates).
        if VEC:
            if FULL or e0 < n:
                return load4(p, row + e0)
            return NEG_INF, NEG_INF, NEG_INF, NEG_INF
        a = p[row + e0] if e0 < n else NEG_INF
        b = p[row + e0 + 1] if e0 + 1 < n else NEG_INF
        c = p[row + e0 + 2] if e0 + 2 < n else NEG_INF
        d = p[row + e0 + 3] if e0 + 3 < n else NEG_INF
        return a, b, c, d

    @cuda.jit(device=True)
    def score(logit, m, scoring):
        # softmax: exp(l - max), scaled by 1 / sum later; sigmoid: the score itself
        if scoring == 0:
            return math.exp(logit - m)
        return sigmoid_fast(logit)

    @cuda.jit(device=True)
    def second_key(k, e, uniform, logits, row):
        # With a bias, equal finite keys of one bias rank by the logit (module docstring).
        if uniform and k > NEG_INF_KEY and k < POS_INF_KEY:
            return key_of(logits[row + e] + float32(0))
        return int32(0)

    @cuda.jit(device=True)
    def after_in_class(k, e, uniform, ll, li, logits, row):
        # Expert e, of the last winner's key k, ranks after it (second key, then id).
        l2 = second_key(k, e, uniform, logits, row)
        return l2 < ll or (l2 == ll and e > li)

    @cuda.jit(device=True)
    def group_score(ks, base, grp, gsize, best):
        # A group's score: the sum of its `best` (1 or 2) largest selection values, and the
        # ids of those two.
        a = b = float32(0)
        ka = kb = MASKED
        ea = eb = int32(0)
        for e in range(grp * gsize, (grp + 1) * gsize):
            v = ks[base + uint32(e)]
            kv = key_of(v)
            if kv > ka:
                b, kb, eb = a, ka, ea
                a, ka, ea = v, kv, int32(e)
            elif kv > kb:
                b, kb, eb = v, kv, int32(e)
        return (a + b if best == 2 else a + float32(0)), ea, eb

    @cuda.jit(device=True)
    def tiny_group(gsum, ea, eb, best, bias):
        # A group whose fp32 score underflowed (below the smallest normal float) from
        # experts of bias 0: its exact sum decides (routing._tiny_group_keys).
        return (gsum >= float32(0) and gsum < TINY_FLOAT and bias[ea] == float32(0)
                and (best == 1 or bias[eb] == float32(0)))

    @cuda.jit(device=True)
    def group_log_scores(grp, gsize, bias, logits, row, m, big, mul, norm_std, scoring):
        # The two best log-scores among the group's experts of bias 0 (log-softmax up to
        # the row's constant, or log-sigmoid), from the (normalized) logits.
        la = lb = NEG_INF
        for e in range(grp * gsize, (grp + 1) * gsize):
            if bias[e] == float32(0):
                l = logits[row + e]
                if norm_std > float32(0):
                    l = quiet_div(l, big) * mul
                lp = l - m
                if scoring == 1:
                    lp = min(l, float32(0)) - math.log1p(math.exp(-abs(l)))
                if lp > la:
                    lb = la
                    la = lp
                elif lp > lb:
                    lb = lp
        return la, lb

    @cuda.jit(device=True)
    def route_token(logits, bias, drop, out_ids, out_w, hist, t, valid, w, lane, fs, js, vs, ls,
                    ks, kept, K, scoring, has_bias, renorm, rsf, groups, topk_group, norm_std):
        """Route token t with warp w; its K ids go into the block's histogram."""
        row = t * n
        first = int32(4 * lane)
        vals = cuda.local.array(V, float32)
        keys = cuda.local.array(V, int32)

        # Logits into registers, and their max (softmax).
        m = NEG_INF
        for g in range(G):
            a, b, c, d = load_group(logits, row, int32(first + 128 * g))
            vals[4 * g] = a
            vals[4 * g + 1] = b
            vals[4 * g + 2] = c
            vals[4 * g + 3] = d
            if scoring == 0:
                m = fmax(fmax(m, a), fmax(b, fmax(c, d)))  # NaN never becomes the max
        big = mul = float32(1)
        if norm_std > float32(0):
            # Logits normalization: L / (std(L) / sigma), std unbiased over the n logits,
            # as the host computes it: u = L / max|L| first (|u| <= 1: the squares neither
            # overflow nor underflow), then u * (sigma / std(u)). std(u) 0 (equal logits)
            # leaves L (u = +-1, u * max|L| = L); a NaN or inf logit makes std(u) NaN and
            # the token's scores NaN, as on the host.
            big = float32(0)
            for i in range(V):
                if FULL or first + 128 * (i >> 2) + (i & 3) < n:
                    big = fmax(big, abs(vals[i]))  # NaN never becomes the max
            big = reduce_max(big, w, lane, fs)
            if big == float32(0):
                big = float32(1)  # all zero (or NaN): u = L
            part = float32(0)
            for i in range(V):
                vals[i] = quiet_div(vals[i], big)  # NaN throughout if big is inf
                if FULL or first + 128 * (i >> 2) + (i & 3) < n:
                    part += vals[i]
            mean = reduce_sum(part, w, lane, fs) / float32(n)
            part = float32(0)
            for i in range(V):
                if FULL or first + 128 * (i >> 2) + (i & 3) < n:
                    dev = vals[i] - mean
                    part += dev * dev
            std = float32(math.sqrt(reduce_sum(part, w, lane, fs) / DOF))
            mul = big if std == float32(0) else norm_std / std
            m = NEG_INF
            for i in range(V):
                vals[i] = vals[i] * mul
                m = fmax(m, vals[i])
        # Selection values: p * scale + bias, or without a bias the logit + nan_or_zero
        # (NaN throughout a softmax row whose sum is NaN, as its scores are; the add also
        # makes NaN canonical and -0 +0 for key_of).
        scale = float32(1)
        total = float32(0)
        if scoring == 0:
            m = reduce_max(m, w, lane, fs)
            for i in range(V):
                ex = score(vals[i], m, scoring)  # as the weights below recompute it
                if has_bias:
                    vals[i] = ex
                total += ex
            total = reduce_sum(total, w, lane, fs)
            scale = float32(1) / total
        elif has_bias:
            for i in range(V):
                vals[i] = score(vals[i], m, scoring)
        nan_or_zero = total * float32(0)

        # Keys; MASKED for experts past the end. The grouped variant also keeps the values
        # in shared memory for the group scores (stored here, so vals dies as keys fills).
        if grouped:
            sync_warp()  # every lane is done with the previous token's ks and kept
        base = uint32(w * n)
        for g in range(G):
            e0 = int32(first + 128 * g)
            b0 = b1 = b2 = b3 = nan_or_zero
            if has_bias:
                b0, b1, b2, b3 = load_group(bias, 0, e0)
                vals[4 * g] = vals[4 * g] * scale + b0
                vals[4 * g + 1] = vals[4 * g + 1] * scale + b1
                vals[4 * g + 2] = vals[4 * g + 2] * scale + b2
                vals[4 * g + 3] = vals[4 * g + 3] * scale + b3
            else:
                vals[4 * g] = vals[4 * g] + b0
                vals[4 * g + 1] = vals[4 * g + 1] + b1
                vals[4 * g + 2] = vals[4 * g + 2] + b2
                vals[4 * g + 3] = vals[4 * g + 3] + b3
            for c in range(4):
                if grouped and (FULL or e0 + c < n):
                    ks[base + uint32(e0 + c)] = vals[4 * g + c]
                keys[4 * g + c] = key_of(vals[4 * g + c])
                if not FULL:
                    keys[4 * g + c] = keys[4 * g + c] if e0 + c < n else MASKED

        if grouped:
            # Keep the topk_group groups whose best value (the best two values' sum when a
            # bias is present) ranks highest; every other expert's key becomes MASKED.
            kept[w, lane] = 0
            sync_warp()
            gsize = n // groups
            best = 2 if has_bias else 1
            if best > gsize:
                best = gsize
            for r in range(topk_group):
                bv = MASKED
                bi = int32(NO_ID)
                top_lp = NEG_INF  # the best log-score among this lane's TINY groups
                for grp in range(lane, groups, 32):
                    if not (kept[w, grp // 32] >> (grp % 32)) & 1:
                        gsum, ea, eb = group_score(ks, base, grp, gsize, best)
                        gkey = key_of(gsum)
                        if has_bias and tiny_group(gsum, ea, eb, best, bias):
                            gkey = TINY
                            la, lb = group_log_scores(grp, gsize, bias, logits, row, m, big,
                                                      mul, norm_std, scoring)
                            top_lp = fmax(top_lp, la)
                        if gkey > bv or (gkey == bv and grp < bi):
                            bv = gkey
                            bi = grp
                bv, bi = reduce_argmax(bv, bi, w, lane, vs, js)
                if has_bias and (bv == TINY or _SIM):
                    # The best remaining groups' fp32 sums underflowed: rank them by their
                    # exact sums, log(p_a + p_b) - A with A the best log-score among them (the
                    # winner's value is near 0, where fp32 resolves it finely).
                    A = reduce_max(top_lp, w, lane, fs)
                    tv = NEG_INF
                    ti = int32(NO_ID)
                    for grp in range(lane, groups, 32):
                        if not (kept[w, grp // 32] >> (grp % 32)) & 1:
                            gsum, ea, eb = group_score(ks, base, grp, gsize, best)
                            if tiny_group(gsum, ea, eb, best, bias):
                                la, lb = group_log_scores(grp, gsize, bias, logits, row, m,
                                                         big, mul, norm_std, scoring)
                                gv = NEG_INF
                                if la > NEG_INF:
                                    gv = la - A
                                    if best == 2:
                                        gv += math.log1p(math.exp(lb - la))
                                if gv > tv or (gv == tv and grp < ti):
                                    tv = gv
                                    ti = grp
                    tv, ti = reduce_argmax(tv, ti, w, lane, fs, js)
                    if bv == TINY:
                        bi = ti
                if lane == 0 and bi < groups:
                    kept[w, bi // 32] |= int32(1) << (bi % 32)
                sync_warp()
            for i in range(V):
                grp = uint32(first + 128 * (i >> 2) + (i & 3)) // uint32(gsize)
                dropped = not (kept[w, grp >> 5] >> (grp & 31)) & 1
                keys[i] = MASKED if dropped else keys[i]

        # First scan: each lane's best 3 candidates, sorted (key desc, id asc). Experts
        # arrive in ascending id, so a later equal key ranks after: a plain ">" inserts, and
        # MASKED keys (past the end, dropped groups) never enter.
        c0v = c1v = c2v = MASKED
        c0i = c1i = c2i = int32(NO_ID)
        for g in range(G):
            for c in range(4):
                v = keys[4 * g + c]
                e = int32(first + 128 * g + c)
                # Insert (v, e): three compares against the old entries, then selects.
                g0 = v > c0v
                g1 = v > c1v
                g2 = v > c2v
                c2v = c1v if g1 else (v if g2 else c2v)
                c2i = c1i if g1 else (e if g2 else c2i)
                c1v = c0v if g0 else (v if g1 else c1v)
                c1i = c0i if g0 else (e if g1 else c1i)
                c0v = v if g0 else c0v
                c0i = e if g0 else c0i

        # K rounds of a warp arg-max over each lane's best remaining candidate. A lane whose
        # cache runs dry rescans its keys for those ranked after the one it just gave.
        my_id = int32(0)
        tie = False
        for r in range(K):
            bv, bi = warp_best(c0v, c0i, w, lane, vs, js)
            # The lane that gave the winner pops it (selects, not a branch: one lane pops).
            win = c0i == bi
            c0v = c1v if win else c0v
            c1v = c2v if win else c1v
            c2v = MASKED if win else c2v
            c0i = c1i if win else c0i
            c1i = c2i if win else c1i
            c2i = int32(NO_ID) if win else c2i
            if win and c0i == NO_ID:
                for g in range(G):
                    for c in range(4):
                        v = keys[4 * g + c]
                        e = int32(first + 128 * g + c)
                        # choosable, and ranked after (bv, bi), the last one given
                        if v > MASKED and (v < bv or (v == bv and e > bi)):
                            if v > c2v:
                                c2v, c2i = v, e
                                if c2v > c1v:
                                    c1v, c2v, c1i, c2i = c2v, c1v, c2i, c1i
                                    if c1v > c0v:
                                        c0v, c1v, c0i, c1i = c1v, c0v, c1i, c0i
            if has_bias:
                # a remaining finite key equal to the winner's: the logit may reorder them
                hit = warp_any(c0v == bv, w, lane, js)
                tie = tie | (hit and bv > NEG_INF_KEY and bv < POS_INF_KEY)
            my_id = bi if lane == r else my_id

        if has_bias and (tie or _SIM):
            # The exact order for this token: K rounds, each taking the largest key with an
            # expert ranked after the last winner, then within that key's experts the best
            # (second key, lower id), the second key being the logit's where all of them
            # have one bias (uniform: a max reduction and a vote), else 0. (The simulator
            # runs it for every token: its block-wide barriers need every warp.)
            lk = POS_INF_KEY
            ll = POS_INF_KEY
            li = int32(-1)
            lu = False
            for r in range(K):
                bk = MASKED
                for g in range(G):
                    for c in range(4):
                        k = keys[4 * g + c]
                        e = int32(first + 128 * g + c)
                        if k > bk and (r == 0 or k < lk or (k == lk and after_in_class(
                                k, e, lu, ll, li, logits, row))):
                            bk = k
                kk = reduce_max(bk, w, lane, vs)
                hi = NEG_INF
                for g in range(G):
                    for c in range(4):
                        if keys[4 * g + c] == kk:
                            hi = max(hi, bias[first + 128 * g + c])
                hi = reduce_max(hi, w, lane, fs)
                other = False
                for g in range(G):
                    for c in range(4):
                        if keys[4 * g + c] == kk and bias[first + 128 * g + c] != hi:
                            other = True
                u = not warp_any(other, w, lane, js)
                bl = MASKED
                be = int32(NO_ID)
                for g in range(G):
                    for c in range(4):
                        e = int32(first + 128 * g + c)
                        if keys[4 * g + c] == kk and (r == 0 or kk < lk or after_in_class(
                                kk, e, lu, ll, li, logits, row)):
                            l2 = second_key(kk, e, u, logits, row)
                            if l2 > bl:  # ascending ids: the first of equal l2 stays
                                bl, be = l2, e
                lk, ll, li = reduce_argmax2(kk, bl, be, w, lane, vs, ls, js)
                lu = u
                if tie and lane == r:  # (the simulator's fast result stands without a tie)
                    my_id = li
        if my_id >= n:
            my_id = 0  # unreachable when K <= choosable experts (validated on the host)

        # Lane r < K writes the r-th winner's weight, from its logit: p, or renormalized
        # in the log domain (exp(log p - max) / sum over the K winners), which stays finite
        # when every chosen score underflows.
        my_p = float32(0)
        my_l = logits[row + my_id] if lane < K else NEG_INF
        if norm_std > float32(0):
            my_l = quiet_div(my_l, big) * mul  # as the values above were normalized
        # drop_zero: the flagged ("zero"-type) experts' slots weigh 0
        dropped = False
        if renorm == 2 and lane < K:
            dropped = ((drop[my_id >> 5] >> (my_id & 31)) & 1) != 0
        if not renorm:
            if lane < K:
                if scoring == 0:
                    my_p = score(my_l, m, scoring) * scale
                else:
                    # sigmoid as exp(l) / (1 + exp(l)) for l < 0: sigmoid(-100) is 3.7e-44,
                    # its fp32 value, not 1 / (1 + inf) = 0
                    ex = math.exp(-abs(my_l))
                    my_p = (float32(1) if my_l >= 0 else ex) / (float32(1) + ex)
        else:
            lp = my_l + nan_or_zero  # log-softmax up to the row's constant
            if scoring == 1:
                lp = min(my_l, float32(0)) - math.log1p(math.exp(-abs(my_l)))  # log-sigmoid
            kept_slot = lane < K and not dropped
            lp = lp if kept_slot else NEG_INF
            top = reduce_max(lp, w, lane, fs)
            ex = math.exp(lp - top) if kept_slot else float32(0)
            wsum = reduce_sum(ex, w, lane, fs)
            if renorm == 2 and wsum == float32(0):
                wsum = float32(1)  # every slot dropped: all weights 0, not 0/0
            my_p = ex / wsum
        if valid and lane < K:
            out_ids[t * K + lane] = my_id
            out_w[t * K + lane] = my_p * rsf
            cuda.atomic.add(hist, my_id, 1)

    def route_kernel(logits, bias, out_ids, out_w, counts, drop, T, K, scoring, has_bias,
                     renorm, rsf, groups, topk_group, norm_std):
        tid = int32(cuda.threadIdx.x)
        w = int32(tid >> 5)
        lane = int32(tid & 31)
        fs = cuda.shared.array((WARPS, 32), float32)
        js = cuda.shared.array((WARPS, 32), int32)
        vs = cuda.shared.array((WARPS, 32), int32)  # the simulator's int reductions
        ls = cuda.shared.array((WARPS, 32), int32)
        ks = cuda.shared.array(0, float32)  # grouped: the warps' values, WARPS * n at launch
        kept = cuda.shared.array((WARPS, 32), int32)  # grouped: bit g % 32 of word g // 32
        # The block's expert counts, added to the global ones once at the end: a few global
        # atomics per block instead of one per (token, slot), which contend on the cache
        # lines of popular experts.
        hist = cuda.shared.array(n, int32)
        e = tid
        while e < n:
            hist[e] = 0
            e += 32 * WARPS
        cuda.syncthreads()
        # The grid is capped at what the GPU holds at once; each block takes WARPS tokens at a
        # time. Every warp of a block runs the same number of steps (block-wide barriers in the
        # simulator): a warp past the end routes the last token again and writes nothing.
        step = int32(cuda.blockIdx.x * WARPS)
        while step < T:
            t = step + w
            valid = t < T
            route_token(logits, bias, drop, out_ids, out_w, hist, t if valid else T - 1, valid,
                        w, lane, fs, js, vs, ls, ks, kept, K, scoring, has_bias, renorm, rsf,
                        groups, topk_group, norm_std)
            step += int32(cuda.gridDim.x * WARPS)
        cuda.syncthreads()
        e = tid
        while e < n:
            c = hist[e]
            if c:
                count_add(counts, e, c)
            e += 32 * WARPS

    return route_kernel
