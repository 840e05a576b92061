"""What the GPU expert paths share: the kernels module, the "auto" thresholds, the row layout
(offsets scan + gather), the per-expert counts and the SiLU-and-mul pass."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .._arrays import DTYPES, cupy_module, vector_width
from .._compile import memoize_per_device, raw_module


class ExpertOutput(NamedTuple):
    rows: Any       # (M, H) rows_dtype(x's dtype): FFN_e(x_t) for each real pair, by expert;
    #                 M may exceed the pairs (padding): rows no slot names are undefined
    slot_rows: Any  # (T, K) int32: row of rows for slot (t, k), -1 for zero-expert slots


def rows_dtype(dtype):
    """The dtype of the expert output rows (and of the pair and fixed paths' activation) for
    a layer of ``dtype``: fp32 for float16, whose range (65504) an expert's output or its
    silu(gate) * up can pass where y does not (docs/spec.md, "Numerics and accuracy"); else
    the layer's dtype."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


STRATEGIES = ("auto", "pairs", "grouped", "padded", "fixed", "syncfree", "capacity")
PAIRS_MAX = 320  # "auto": (token, slot) pairs up to which the pair path runs (fp16, fp32)
# bf16 and fp8 layers take the pair kernels only up to this many (token, slot) pairs, eagerly
# and in graphs, then the sync-free ones (or "capacity", bf16, from capacity.CAPACITY_MIN_PAIRS
# pairs per expert), which read each active expert once (the pair kernels once per pair of it). LongCat-Flash on the H200, ms pair kernels / sync-free kernels, each
# line one run: graph replay at 4 / 8 / 16 / 24 tokens, fp8 0.359 / 0.387, 0.618 / 0.636,
# 1.237 / 1.150, 1.790 / 1.583; bf16 0.563 / 0.663, 1.055 / 1.115, 2.143 / 2.074, 3.162 /
# 2.864. Eager at 8 / 16 / 24 tokens, before the stream kernels kept several loads in flight
# (kernels/async_mma.cuh STREAM_DEPTH), which sped the sync-free ones up by 5-20%: bf16
# 1.336 / 1.327, 2.431 / 2.411, 3.500 / 3.401; fp8 0.775 / 0.905, 1.437 / 1.342, 1.966 /
# 1.818. (fp16 and fp32 layers, not measured, keep PAIRS_MAX.)
PAIRS_MAX_BF16_FP8 = 128
PADDED_MIN_ROWS = 48    # "auto": mean rows per active expert from which padded tiles win
PAD_ROWS, MAX_TILE = 64, 512
UNIFORM_MAX_ROWS = 64   # "auto": most rows of one expert up to which one uniform tile wins
FIXED_TILE = 64  # kernels/experts.cu
PAIR_ROWS = {True: 2, False: 4}  # output features per warp in pair_gemv: GLU / plain
PAIR_WARPS = 4


def pairs_max(dtype: str, quantization: str | None = None) -> int:
    """The (token, slot) pairs up to which "auto" (and a graph) takes the pair kernels for a
    layer of ``dtype`` (a config dtype name) and ``quantization``: PAIRS_MAX_BF16_FP8 for bf16
    and fp8 layers, else PAIRS_MAX."""
    return PAIRS_MAX_BF16_FP8 if quantization == "fp8" or dtype == "bfloat16" else PAIRS_MAX


def no_mark(stage: str) -> None:
    """The stage_marks callback that records nothing."""


def out_ctype(ctype: str) -> str:
    """The C type of rows_dtype (see there) for a layer of C type ``ctype``."""
    return "float" if ctype == "__half" else ctype


def experts_kernel_names() -> list[str]:
    """Every instantiation in kernels/experts.cu that the GPU path may launch."""
    names = ["expert_offsets", "scale_rows", "capacity_pointers"]
    for _, (dt, ctype) in DTYPES.items():
        o = out_ctype(ctype)
        names += [f"fixed_gemm_nt<{ctype},{ctype},{ctype}>", f"fixed_gemm_nt<{ctype},{o},{o}>"]
        for vec in (1, 16 // dt.itemsize):
            names += [f"gather_rows<{ctype},{vec}>", f"silu_mul<{ctype},{o},{vec}>",
                      f"pair_gemv<{ctype},{ctype},{o},{vec},{PAIR_ROWS[True]},true>",
                      f"pair_gemv<{ctype},{o},{o},{vec},{PAIR_ROWS[False]},false>"]
            if ctype == "__half":
                names += [f"half_rows_scaled<true,{vec}>", f"half_rows_scaled<false,{vec}>"]
    return sorted(set(names), key=names.index)


@memoize_per_device
def experts_module():
    return raw_module("experts.cu", experts_kernel_names())


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


def real_counts(ids, expert_counts, E):
    """(E,) int32 pairs per real expert: ``route``'s counts when given, else a histogram of
    the ids on the device (no host synchronization, unlike cupy.bincount)."""
    cp = cupy_module()
    if expert_counts is not None:
        return cp.ascontiguousarray(expert_counts[:E], dtype=np.int32)
    flat = ids.ravel()
    counts = cp.zeros(E + 1, np.int32)
    cp.add.at(counts, cp.where((flat >= 0) & (flat < E), flat, E), 1)  # E: zero-expert slots
    return counts[:E]


def gather(mod, ctype, x, ids, counts, E, pad, rows_total):
    """Each expert's rows laid out by the device scan of the counts (blocks rounded up to a
    multiple of ``pad``), and x's row copied there for every real (token, slot) pair.
    Returns (offsets (E+1,), slot_rows (T, K), xs (rows_total, H))."""
    cp = cupy_module()
    offsets = cp.empty(E + 1, np.int32)
    cursor = cp.empty(E, np.int32)
    mod.get_function("expert_offsets")((1,), (1024,), (counts, np.int32(E), np.int32(pad),
                                                       offsets, cursor))
    slot_rows, xs = gather_rows(mod, ctype, x, ids, offsets, cursor, E, rows_total)
    return offsets, slot_rows, xs


def gather_rows(mod, ctype, x, ids, offsets, cursor, E, rows_total, capacity=0, spill=None,
                copy=True):
    """x's row copied to row offsets[e] + (a claim on cursor[e]) of xs for every real
    (token, slot) pair; ``cursor`` (E,) must be zero. Returns (slot_rows (T, K), xs).
    With ``capacity`` > 0, claims from ``capacity`` on get no row: their slot_rows are -1 and
    ``spill`` (T, K) int32 gets their expert (-1 for every other slot). ``copy=False``: the
    claims only, xs is None (a caller that reads x through slot_rows itself)."""
    cp = cupy_module()
    T, H = x.shape
    K = ids.shape[1]
    slot_rows = cp.empty((T, K), np.int32)
    xs = cp.empty((rows_total, H), x.dtype) if copy else None
    if T * K:
        x_stride = x.strides[0] // x.itemsize
        vec = vector_width(x.itemsize, H, x, xs, row_stride=x_stride) if copy else 1
        threads = min(256, max(32, -(-(H // vec) // 32) * 32)) if copy else 32
        mod.get_function(f"gather_rows<{ctype},{vec}>")(
            (T * K,), (threads,), (x, np.int64(x_stride), ids, np.int32(K), np.int32(E),
                                   offsets, cursor, slot_rows,
                                   xs if copy else np.uint64(0), np.int32(H),
                                   np.int32(capacity), spill if capacity else 0))
    return slot_rows, xs


def silu_mul(mod, ctype, gate_up, h, M, I):
    """h = silu(gate) * up, stored in h's dtype (gate_up's, or fp32)."""
    vec = vector_width(gate_up.itemsize, I, gate_up, h)
    n = M * (I // vec)
    blocks = int(min(max(1, -(-n // 256)), 132 * 16))  # grid-stride: a cap, right on any GPU
    o = "float" if h.dtype == np.float32 else ctype
    mod.get_function(f"silu_mul<{ctype},{o},{vec}>")((blocks,), (256,),
                                                      (gate_up, h, np.int64(M), np.int32(I)))


_ROW_WARPS = 8  # SILU_WARPS in kernels/experts.cu: rows per block


def half_rows_scaled(mod, src, h, M, I):
    """fp16 activation rows h (M, I) for a half GEMM, each with a power-of-two scale where it
    passes 65504: from gate_up (M, 2I) fp16 (silu(gate) * up), or from fp32 activation rows
    (M, I). Returns row_scale (M,) fp32, which scale_rows (or the GEMM) applies to the output."""
    cp = cupy_module()
    row_scale = cp.empty(M, np.float32)
    if M:
        act = src.dtype != np.float32
        vec = vector_width(2, I, src, h)
        if not act and src.data.ptr % (vec * 4):
            vec = 1
        blocks = int(min(-(-M // _ROW_WARPS), 132 * 16))
        mod.get_function(f"half_rows_scaled<{str(act).lower()},{vec}>")(
            (blocks,), (32 * _ROW_WARPS,), (src, h, row_scale, np.int64(M), np.int32(I)))
    return row_scale


def scale_rows(mod, rows, row_scale):
    """rows (M, H) fp32 *= row_scale[:, None], in place (rows of scale 1 are not touched)."""
    M, H = rows.shape
    if M:
        blocks = int(min(-(-M // _ROW_WARPS), 132 * 16))
        mod.get_function("scale_rows")((blocks,), (32 * _ROW_WARPS,),
                                       (rows, row_scale, np.int64(M), np.int32(H)))
