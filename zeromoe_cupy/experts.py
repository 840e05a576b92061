"""The real experts (SPEC.md step 8): permute -> GEMM 1 -> SiLU * up -> GEMM 2.

The output stays in expert order: ``rows`` holds one row per real (token, slot) pair and
``slot_rows[t, k]`` says which (-1 for zero-expert slots); ``combine`` reads it from there.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

from ._arrays import (DTYPES, as_array, cupy_module, dtype_name, fixed_order_matmul, is_cupy,
                      vector_width, with_unit_row_layout)
from ._compile import memoize_per_device, raw_module


class ExpertOutput(NamedTuple):
    rows: Any       # (M, H) x's dtype: FFN_e(x_t) for each real pair, grouped by expert
    slot_rows: Any  # (T, K) int32: row of rows for slot (t, k), -1 for zero-expert slots


def _check(x, topk_ids, w13, w2):
    if x.ndim != 2:
        raise ValueError(f"x: expected a 2-D array [T, H], got shape {x.shape}")
    if dtype_name(x.dtype) is None:
        raise TypeError(f"x: expected bfloat16, float16 or float32, got {x.dtype}")
    T, H = x.shape
    if topk_ids.ndim != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids: expected shape [T={T}, K], got {topk_ids.shape}")
    if topk_ids.dtype.kind not in "iu":
        raise TypeError(f"topk_ids: expected an integer array, got {topk_ids.dtype}")
    if w13.ndim != 3 or w13.shape[2] != H or w13.shape[1] % 2:
        raise ValueError(f"w13: expected shape [E, 2I, H={H}], got {w13.shape}")
    E, I2 = w13.shape[0], w13.shape[1]
    if w2.shape != (E, H, I2 // 2):
        raise ValueError(f"w2: expected shape ({E}, {H}, {I2 // 2}), got {w2.shape}")
    for name, a in (("topk_ids", topk_ids), ("w13", w13), ("w2", w2)):
        if is_cupy(a) != is_cupy(x):
            raise TypeError(f"{name}: expected the same array kind as x "
                            f"({'CuPy' if is_cupy(x) else 'NumPy'})")
    for name, a in (("w13", w13), ("w2", w2)):
        if a.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (x's), got {a.dtype}")


def expert_mlp(x, topk_ids, w13, w2, *, expert_counts=None, allow_tf32: bool = False,
               strategy: str = "auto",
               stage_marks: Callable[[str], None] | None = None) -> ExpertOutput:
    """FFN_e(x_t) = w2[e] @ (silu(w13[e, :I] @ x_t) * (w13[e, I:] @ x_t)) for every real slot.

    Slots whose id is >= E (zero experts) are skipped. ``expert_counts`` ([>= E] int32, as
    ``route`` returns) saves a histogram pass on the GPU. ``strategy`` picks the GPU path
    ("auto", "pairs", "grouped", "padded" or "fixed"; see below); every path computes the
    same values up to fp32 rounding; "fixed" gives the same bits for a token in any batch
    (on the CPU too, where the other choices all mean NumPy's matmul). ``stage_marks(name)``,
    if given, is called after each stage is enqueued ("permute", "gemm1", "activation",
    "gemm2"); the benchmark records CUDA events there. Inputs are never modified.
    """
    x = as_array(x, "x")
    topk_ids = as_array(topk_ids, "topk_ids")
    w13 = as_array(w13, "w13")
    w2 = as_array(w2, "w2")
    _check(x, topk_ids, w13, w2)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    mark = stage_marks or _no_mark
    if is_cupy(x):
        return _expert_mlp_gpu(x, topk_ids, w13, w2, expert_counts, allow_tf32, mark, strategy)
    return _expert_mlp_numpy(x, topk_ids, w13, w2, mark, fixed_order=strategy == "fixed")


def _no_mark(stage: str) -> None:
    pass


def _silu(v):
    with np.errstate(over="ignore"):
        return v / (np.float32(1) + np.exp(-v))


def _expert_mlp_numpy(x, topk_ids, w13, w2, mark, fixed_order=False):
    T, H = x.shape
    E, I = w13.shape[0], w13.shape[1] // 2
    K = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).astype(np.int64)
    real = np.nonzero((flat >= 0) & (flat < E))[0]
    order = real[np.argsort(flat[real], kind="stable")]  # pairs grouped by expert
    slot_rows = np.full(T * K, -1, np.int32)
    slot_rows[order] = np.arange(order.size, dtype=np.int32)
    xs = x[order // K].astype(np.float32)
    experts, starts = np.unique(flat[order], return_index=True)
    blocks = list(zip(experts, starts, np.append(starts[1:], order.size)))
    mark("permute")
    matmul = fixed_order_matmul if fixed_order else np.matmul
    gate_up = np.empty((order.size, 2 * I), np.float32)
    for e, s, t in blocks:  # a loop over active experts, not tokens
        gate_up[s:t] = matmul(xs[s:t], w13[e].astype(np.float32).T)
    gate_up = gate_up.astype(x.dtype).astype(np.float32)  # rounded as the GPU stores it
    mark("gemm1")
    h = (_silu(gate_up[:, :I]) * gate_up[:, I:]).astype(x.dtype).astype(np.float32)
    mark("activation")
    rows = np.empty((order.size, H), x.dtype)
    for e, s, t in blocks:
        rows[s:t] = matmul(h[s:t], w2[e].astype(np.float32).T).astype(x.dtype)
    mark("gemm2")
    return ExpertOutput(rows, slot_rows.reshape(T, K))


# ---------------------------------------------------------------------------------------------
# GPU paths, chosen per call by ``strategy`` ("auto" picks by the rules below):
# - "pairs": a few tokens. One matrix-vector kernel per GEMM over the (token, slot) pairs,
#   reading the routing ids on the device: no permutation and no host synchronization.
# - "grouped": offsets (device scan) -> gather (atomics give each pair its row) -> one host copy
#   of the per-expert counts (cuBLAS wants group sizes on the host) -> cublasGemmGroupedBatchedEx,
#   one group per active expert. Near the bytes floor while experts get few rows each.
# - "padded": the same, but each expert's rows padded to a multiple of PAD_ROWS and cut into
#   tiles of at most MAX_TILE rows; tiles of one size form one cublasGemmBatchedEx call (a few
#   calls in all). With many rows per expert the forward measured 1.3x (4096 tokens) to 3x
#   (16384) faster this way than with the grouped call at LongCat shapes (NOTES.md); an expert's
#   weights are read once per tile, and padding adds < PAD_ROWS rows per expert.
# - "fixed" (never picked by "auto"): the padded layout (FIXED_TILE rows) and our own tiled
#   GEMM kernel, whose every output sums over k in one fixed order: a token's result has the
#   same bits whatever the batch or chunk it comes in. No host synchronization; several times
#   slower than cuBLAS at large T (fp32 FMAs, no tensor cores).
STRATEGIES = ("auto", "pairs", "grouped", "padded", "fixed")
PAIRS_MAX = 320         # "auto": (token, slot) pairs up to which the pair path runs
PADDED_MIN_ROWS = 48    # "auto": mean rows per active expert from which padded tiles win
PAD_ROWS, MAX_TILE = 64, 512
FIXED_TILE = 64  # kernels/experts.cu
_PAIR_ROWS = {True: 2, False: 4}  # output features per warp in pair_gemv: GLU / plain
_PAIR_WARPS = 4


def experts_kernel_names() -> list[str]:
    """Every instantiation in kernels/experts.cu that the GPU path may launch."""
    names = ["expert_offsets"]
    for _, (dt, ctype) in DTYPES.items():
        names.append(f"fixed_gemm_nt<{ctype}>")
        for vec in (1, 16 // dt.itemsize):
            names += [f"gather_rows<{ctype},{vec}>", f"silu_mul<{ctype},{vec}>"]
            names += [f"pair_gemv<{ctype},{vec},{_PAIR_ROWS[glu]},{str(glu).lower()}>"
                      for glu in (True, False)]
    return names


@memoize_per_device
def _experts_module():
    return raw_module("experts.cu", experts_kernel_names())


def _expert_mlp_gpu(x, topk_ids, w13, w2, expert_counts, allow_tf32, mark, strategy):
    cp = cupy_module()
    T, H = x.shape
    K = topk_ids.shape[1]
    ids = cp.ascontiguousarray(topk_ids, dtype=np.int32)
    x = with_unit_row_layout(x)
    w13 = cp.ascontiguousarray(w13)
    w2 = cp.ascontiguousarray(w2)
    if strategy == "auto" and T * K <= PAIRS_MAX:
        strategy = "pairs"
    if strategy == "pairs":
        if T * K > 65535:
            raise ValueError(f"strategy='pairs': expected T * K <= 65535 (token, slot) pairs, "
                             f"got {T * K}")
        return _pairs(x, ids, w13, w2, mark)
    if strategy == "fixed":
        return _fixed(x, ids, w13, w2, expert_counts, mark)
    return _sorted(x, ids, w13, w2, expert_counts, allow_tf32, mark, strategy)


def _pairs(x, ids, w13, w2, mark):
    cp = cupy_module()
    T, H = x.shape
    E, I2 = w13.shape[0], w13.shape[1]
    I = I2 // 2
    K = ids.shape[1]
    P = T * K
    ctype = DTYPES[dtype_name(x.dtype)][1]
    mod = _experts_module()
    slot_rows = cp.empty((T, K), np.int32)
    h = cp.empty((P, I), x.dtype)
    rows = cp.empty((P, H), x.dtype)
    mark("permute")
    if P:
        x_stride = x.strides[0] // x.itemsize
        for glu, src, stride, div, W, N, Kd, out in (
                (True, x, x_stride, K, w13, I, H, h), (False, h, I, 1, w2, H, I, rows)):
            vec = vector_width(x.itemsize, Kd, src, W, row_stride=stride)
            R = _PAIR_ROWS[glu]
            grid = (-(-N // (_PAIR_WARPS * R)), P)
            mod.get_function(f"pair_gemv<{ctype},{vec},{R},{str(glu).lower()}>")(
                grid, (32 * _PAIR_WARPS,),
                (src, np.int64(stride), np.int32(div), ids, np.int32(E), W, np.int32(N),
                 np.int32(Kd), out, slot_rows))
            if glu:
                mark("gemm1")
                mark("activation")  # fused into the first pass
    else:
        for stage in ("gemm1", "activation"):
            mark(stage)
    mark("gemm2")
    return ExpertOutput(rows, slot_rows)


def tile_plan(counts, pad: int, max_tile: int):
    """The layout of the "padded" strategy, from per-expert row counts (host ints).

    Returns (starts, rows_total, tiles): expert e's rows begin at starts[e] (an exclusive scan
    of the counts rounded up to a multiple of ``pad``, as the expert_offsets kernel computes);
    tiles is a list of (tile rows, experts, first rows), one entry per tile size: each
    expert's padded rows cut into ``max_tile``-row tiles and one smaller last tile.
    With pad == 1 (no padding) tiles is empty.
    """
    counts = np.asarray(counts, np.int64)
    padded = -(-counts // pad) * pad
    ends = np.cumsum(padded)
    starts = ends - padded
    rows_total = int(ends[-1]) if ends.size else 0
    if pad == 1:
        return starts, rows_total, []
    full = padded // max_tile
    e = np.repeat(np.arange(counts.size), full)
    within = np.arange(e.size) - np.repeat(np.cumsum(full) - full, full)
    tiles = [(max_tile, e, starts[e] + within * max_tile)] if e.size else []
    rest = padded - full * max_tile
    for size in np.unique(rest[rest > 0]):
        e = np.nonzero(rest == size)[0]
        tiles.append((int(size), e, starts[e] + full[e] * max_tile))
    return starts, rows_total, tiles


def _sorted(x, ids, w13, w2, expert_counts, allow_tf32, mark, strategy):
    from . import _cublas

    cp = cupy_module()
    T, H = x.shape
    E, I2 = w13.shape[0], w13.shape[1]
    I = I2 // 2
    name = dtype_name(x.dtype)
    ctype = DTYPES[name][1]
    mod = _experts_module()
    counts = _real_counts(ids, expert_counts, E)
    counts_host = counts.get().astype(np.int64)  # the one host synchronization of the pass
    active = np.nonzero(counts_host)[0]
    M = int(counts_host.sum())
    item = x.itemsize
    # cuBLAS's grouped and batched calls want 16-byte aligned matrices: rows of H or I elements
    # keep that only when H and I are multiples of 16 bytes' worth of elements.
    aligned = (H * item) % 16 == 0 and (I * item) % 16 == 0
    if strategy == "auto":
        strategy = "padded" if (aligned and active.size
                                and M >= PADDED_MIN_ROWS * active.size) else "grouped"
    if strategy == "padded" and not aligned:
        strategy = "grouped"  # the per-expert fallback below serves odd sizes
    pad = PAD_ROWS if strategy == "padded" else 1
    starts, rows_total, tiles = tile_plan(counts_host, pad, MAX_TILE)
    offsets, slot_rows, xs = _gather(mod, ctype, x, ids, counts, E, pad, rows_total)
    gate_up = cp.empty((rows_total, I2), x.dtype)
    h = cp.empty((rows_total, I), x.dtype)
    rows = cp.empty((rows_total, H), x.dtype)
    mark("permute")
    if M == 0:
        for stage in ("gemm1", "activation", "gemm2"):
            mark(stage)
        return ExpertOutput(rows, slot_rows)

    def pointers(experts, row_starts):
        """Device pointer arrays (weights, inputs, outputs) of GEMM 1 and of GEMM 2 for
        matrices of the given experts starting at the given rows."""
        return [cp.asarray(np.stack([W.data.ptr + experts * (W.size // E * item),
                                     src.data.ptr + row_starts * (src.shape[1] * item),
                                     dst.data.ptr + row_starts * (dst.shape[1] * item)])
                           .astype(np.uint64)) for W, src, dst in ((w13, xs, gate_up),
                                                                   (w2, h, rows))]

    if strategy == "padded":
        tiles = [(size, pointers(e, r)) for size, e, r in tiles]
        for size, p in tiles:
            _cublas.batched_gemm_nt(p[0][0], p[0][1], p[0][2], size, I2, H, name, allow_tf32)
        mark("gemm1")
        _silu_mul(mod, ctype, gate_up, h, rows_total, I)
        mark("activation")
        for size, p in tiles:
            _cublas.batched_gemm_nt(p[1][0], p[1][1], p[1][2], size, H, I, name, allow_tf32)
        mark("gemm2")
    elif aligned and _cublas.has_grouped_gemm():
        p = pointers(active, starts[active])
        m = counts_host[active]
        _cublas.grouped_gemm_nt(p[0][0], p[0][1], p[0][2], m, I2, H, name, allow_tf32)
        mark("gemm1")
        _silu_mul(mod, ctype, gate_up, h, rows_total, I)
        mark("activation")
        _cublas.grouped_gemm_nt(p[1][0], p[1][1], p[1][2], m, H, I, name, allow_tf32)
        mark("gemm2")
    else:  # odd sizes, or cuBLAS < 12.5: one cublasGemmEx per active expert
        for e in active:
            s, n = starts[e], counts_host[e]
            _cublas.gemm_nt(w13[e], xs[s:s + n], gate_up[s:s + n], allow_tf32)
        mark("gemm1")
        _silu_mul(mod, ctype, gate_up, h, rows_total, I)
        mark("activation")
        for e in active:
            s, n = starts[e], counts_host[e]
            _cublas.gemm_nt(w2[e], h[s:s + n], rows[s:s + n], allow_tf32)
        mark("gemm2")
    return ExpertOutput(rows, slot_rows)


def _fixed(x, ids, w13, w2, expert_counts, mark):
    cp = cupy_module()
    T, H = x.shape
    E, I2 = w13.shape[0], w13.shape[1]
    I = I2 // 2
    K = ids.shape[1]
    ctype = DTYPES[dtype_name(x.dtype)][1]
    mod = _experts_module()
    counts = _real_counts(ids, expert_counts, E)
    # Rows: each expert's block rounded up to whole tiles. A bound known without the counts
    # on the host: at most T*K real pairs plus under FIXED_TILE padding per active expert,
    # and a whole number of tiles (the blocks' total is one).
    pairs = T * K
    rows_bound = (pairs + min(E, pairs) * (FIXED_TILE - 1)) // FIXED_TILE * FIXED_TILE
    offsets, slot_rows, xs = _gather(mod, ctype, x, ids, counts, E, FIXED_TILE, rows_bound)
    gate_up = cp.empty((rows_bound, I2), x.dtype)
    h = cp.empty((rows_bound, I), x.dtype)
    rows = cp.empty((rows_bound, H), x.dtype)
    mark("permute")
    tiles = rows_bound // FIXED_TILE
    if tiles == 0:
        for stage in ("gemm1", "activation", "gemm2"):
            mark(stage)
        return ExpertOutput(rows, slot_rows)
    gemm = mod.get_function(f"fixed_gemm_nt<{ctype}>")
    gemm((-(-I2 // FIXED_TILE), tiles), (256,),
         (xs, w13, gate_up, offsets, np.int32(E), np.int32(I2), np.int32(H)))
    mark("gemm1")
    _silu_mul(mod, ctype, gate_up, h, rows_bound, I)
    mark("activation")
    gemm((-(-H // FIXED_TILE), tiles), (256,),
         (h, w2, rows, offsets, np.int32(E), np.int32(H), np.int32(I)))
    mark("gemm2")
    return ExpertOutput(rows, slot_rows)


def _real_counts(ids, expert_counts, E):
    """(E,) int32 pairs per real expert: ``route``'s counts when given, else a histogram of
    the ids on the device (no host synchronization, unlike cupy.bincount)."""
    cp = cupy_module()
    if expert_counts is not None:
        return cp.ascontiguousarray(expert_counts[:E], dtype=np.int32)
    flat = ids.ravel()
    counts = cp.zeros(E + 1, np.int32)
    cp.add.at(counts, cp.where((flat >= 0) & (flat < E), flat, E), 1)  # E: zero-expert slots
    return counts[:E]


def _gather(mod, ctype, x, ids, counts, E, pad, rows_total):
    """Each expert's rows laid out by the device scan of the counts (blocks rounded up to a
    multiple of ``pad``), and x's row copied there for every real (token, slot) pair.
    Returns (offsets (E+1,), slot_rows (T, K), xs (rows_total, H))."""
    cp = cupy_module()
    T, H = x.shape
    K = ids.shape[1]
    offsets = cp.empty(E + 1, np.int32)
    cursor = cp.empty(E, np.int32)
    mod.get_function("expert_offsets")((1,), (1024,), (counts, np.int32(E), np.int32(pad),
                                                       offsets, cursor))
    slot_rows = cp.empty((T, K), np.int32)
    xs = cp.empty((rows_total, H), x.dtype)
    if T * K:
        x_stride = x.strides[0] // x.itemsize
        vec = vector_width(x.itemsize, H, x, xs, row_stride=x_stride)
        threads = min(256, max(32, -(-(H // vec) // 32) * 32))
        mod.get_function(f"gather_rows<{ctype},{vec}>")(
            (T * K,), (threads,), (x, np.int64(x_stride), ids, np.int32(K), np.int32(E),
                                   offsets, cursor, slot_rows, xs, np.int32(H)))
    return offsets, slot_rows, xs


def _silu_mul(mod, ctype, gate_up, h, M, I):
    vec = vector_width(gate_up.itemsize, I, gate_up, h)
    n = M * (I // vec)
    blocks = int(min(max(1, -(-n // 256)), 132 * 16))  # grid-stride: a cap, right on any GPU
    mod.get_function(f"silu_mul<{ctype},{vec}>")((blocks,), (256,),
                                                  (gate_up, h, np.int64(M), np.int32(I)))
