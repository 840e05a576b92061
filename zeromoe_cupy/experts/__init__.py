"""The real experts (docs/spec.md, step 8): permute -> GEMM 1 -> SiLU * up -> GEMM 2.

One module per GPU path (pairs, grouped/padded, fixed, syncfree, capacity, fp8) and one for the
CPU; this module checks the arguments and picks the path. The output stays in expert order:
``rows`` holds one row per real (token, slot) pair and ``slot_rows[t, k]`` says which (-1 for
zero-expert slots); ``combine`` reads it from there. ``rows`` is in x's dtype, except for
float16: fp32 there, and the activation is kept from overflowing too (rows_dtype), so that no
intermediate passes 65504 where y does not.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .._arrays import as_array, check_bool, cupy_module, dtype_name, is_cupy, with_unit_row_layout
from .. import quant
from . import capacity, fixed, fp8, grouped, numpy_path, pairs, syncfree
from ._common import (FIXED_TILE, MAX_TILE, PAD_ROWS, PADDED_MIN_ROWS, PAIRS_MAX,
                      PAIRS_MAX_BF16_FP8, STRATEGIES, UNIFORM_MAX_ROWS, ExpertOutput,
                      experts_kernel_names, no_mark, pairs_max, rows_dtype, tile_plan)

__all__ = ["FIXED_TILE", "MAX_TILE", "PAD_ROWS", "PADDED_MIN_ROWS", "PAIRS_MAX",
           "PAIRS_MAX_BF16_FP8", "STRATEGIES", "UNIFORM_MAX_ROWS", "ExpertOutput", "expert_mlp",
           "experts_kernel_names", "no_mark", "pairs_max", "rows_dtype", "run_experts",
           "tile_plan"]


def _check(x, topk_ids, w13, w2, scales=None):
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
    if w2.ndim == 3 and w2.shape[:2] == (E, H) and w2.shape[2] != I2 // 2:
        raise ValueError(f"w13, w2: expected the same I in w13 [E, 2I, H] and w2 [E, H, I], got "
                         f"w13 {tuple(w13.shape)} (I = {I2 // 2}) and w2 {tuple(w2.shape)} "
                         f"(I = {w2.shape[2]})")
    if w2.shape != (E, H, I2 // 2):
        raise ValueError(f"w2: expected shape ({E}, {H}, {I2 // 2}), got {w2.shape}")
    for name, a in (("topk_ids", topk_ids), ("w13", w13), ("w2", w2)):
        if is_cupy(a) != is_cupy(x):
            raise TypeError(f"{name}: expected the same array kind as x "
                            f"({'CuPy' if is_cupy(x) else 'NumPy'})")
    if scales is None:
        for name, a in (("w13", w13), ("w2", w2)):
            if a.dtype != x.dtype and quant.is_e4m3(a):
                raise TypeError(f"{name}: e4m3 weights ({a.dtype}) are FP8 experts: pass their "
                                f"block scales w13_scale_inv and w2_scale_inv too, or weights "
                                f"in x's dtype {x.dtype}")
            if a.dtype != x.dtype:
                raise TypeError(f"{name}: expected dtype {x.dtype} (x's), got {a.dtype}")
        return
    for name, a, s, glu in (("w13", w13, scales[0], True), ("w2", w2, scales[1], False)):
        if not quant.is_e4m3(a):
            raise TypeError(f"{name}: expected e4m3 weights (float8_e4m3fn, or uint8 bits) "
                            f"with {name}_scale_inv, got {a.dtype}")
        want = quant.scale_shape(a.shape, glu)
        if s is None or tuple(s.shape) != want:
            raise ValueError(f"{name}_scale_inv: expected shape {want}, got "
                             f"{None if s is None else tuple(s.shape)}")
        if is_cupy(s) != is_cupy(x):
            raise TypeError(f"{name}_scale_inv: expected the same array kind as x")


def expert_mlp(x, topk_ids, w13, w2, *, expert_counts=None, allow_tf32: bool = False,
               strategy: str = "auto", stage_marks: Callable[[str], None] | None = None,
               w13_scale_inv=None, w2_scale_inv=None) -> ExpertOutput:
    """FFN_e(x_t) = w2[e] @ (silu(w13[e, :I] @ x_t) * (w13[e, I:] @ x_t)) for every real slot.

    Args:
        x: [T, H] bfloat16, float16 or float32.
        topk_ids: integer [T, K]; slots whose id is outside [0, E) (zero experts) are skipped.
        w13: [E, 2I, H] in x's dtype (gate rows 0..I-1, up rows I..2I-1); w2: [E, H, I].
        expert_counts: optional integer [>= E] (the counts ``route`` returned): checked
            (shape, dtype, array kind), then not used. The GPU paths count the ids
            themselves (one histogram pass, no host synchronization), so that counts which
            do not match the ids can never direct a read or write out of bounds. (The layer,
            whose counts come from its own ``route``, hands them to the paths directly.)
    Returns:
        ExpertOutput(rows [M, H] in rows_dtype(x.dtype) (x's dtype; float32 for float16),
        grouped by expert, M >= the real (token, slot) pairs: the padded and sync-free paths
        leave rows no slot names, whose values are undefined; slot_rows int32 [T, K], the
        row of each slot, -1 for zero-expert slots).

    ``strategy`` picks the GPU path ("auto", "pairs", "grouped", "padded", "fixed", "syncfree" or
    "capacity"; see below); every path computes the same values up to fp32 rounding (for
    float16, up to the fp16 rounding of the activation, which "pairs" and "fixed" keep in
    fp32); "fixed" gives the same bits for a token in any batch (on the CPU too, where the
    other choices all mean NumPy's matmul). ``stage_marks(name)``, if given, is called after
    each stage is enqueued ("permute", "gemm1", "activation", "gemm2"); the benchmark records
    CUDA events there. Inputs are never modified.
    FP8 experts (docs/spec.md "FP8 experts"): w13 / w2 e4m3 (NumPy float8_e4m3fn or uint8 bits;
    CuPy uint8 bits) with fp32 block scales ``w13_scale_inv`` [E, 2*ceil(I/128), ceil(H/128)]
    and ``w2_scale_inv`` [E, ceil(H/128), ceil(I/128)]: the GPU paths of ``experts.fp8``.
    """
    x = as_array(x, "x")
    topk_ids = as_array(topk_ids, "topk_ids")
    w13 = as_array(w13, "w13")
    w2 = as_array(w2, "w2")
    scales = None
    if w13_scale_inv is not None or w2_scale_inv is not None:
        scales = (as_array(w13_scale_inv, "w13_scale_inv", allow_none=True),
                  as_array(w2_scale_inv, "w2_scale_inv", allow_none=True))
    _check(x, topk_ids, w13, w2, scales)
    if expert_counts is not None:
        expert_counts = as_array(expert_counts, "expert_counts")
        E = w13.shape[0]
        if expert_counts.ndim != 1 or expert_counts.shape[0] < E:
            raise ValueError(f"expert_counts: expected shape [>= E={E}], "
                             f"got {tuple(expert_counts.shape)}")
        if expert_counts.dtype.kind not in "iu":
            raise TypeError(f"expert_counts: expected an integer array, got {expert_counts.dtype}")
        if is_cupy(expert_counts) != is_cupy(x):
            raise TypeError("expert_counts: expected the same array kind as x "
                            f"({'CuPy' if is_cupy(x) else 'NumPy'})")
    check_bool("allow_tf32", allow_tf32)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    return run_experts(x, topk_ids, w13, w2, None, allow_tf32, strategy, stage_marks, scales)


def run_experts(x, topk_ids, w13, w2, route_counts, allow_tf32: bool = False,
                strategy: str = "auto", stage_marks=None, scales=None) -> ExpertOutput:
    """expert_mlp without the argument checks, for callers that checked them (the layer,
    graphs, the benchmark). ``route_counts``: None, or the expert_counts that ``route``
    returned for exactly these ids (on the GPU they lay out the rows unchecked: counts
    that do not match the ids would read and write out of bounds). ``scales``: None, or
    (w13_scale_inv, w2_scale_inv) for e4m3 weights."""
    mark = stage_marks or no_mark
    if scales is not None:
        if is_cupy(x):
            return fp8.expert_mlp_fp8(x, topk_ids, w13, w2, scales, route_counts, mark,
                                      strategy)
        return numpy_path.expert_mlp_numpy(x, topk_ids, w13, w2, mark, scales=scales)
    if is_cupy(x):
        return _expert_mlp_gpu(x, topk_ids, w13, w2, route_counts, allow_tf32, mark, strategy)
    return numpy_path.expert_mlp_numpy(x, topk_ids, w13, w2, mark, fixed_order=strategy == "fixed")


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
#   "auto" also takes this path with one uniform tile (every active expert padded to the most
#   rows any has, rounded up to 8) while that is at most UNIFORM_MAX_ROWS: one batched call per
#   GEMM, which read the weights at 97-102% of the copy rate for 8 to 48 rows at LongCat
#   shapes (H200), where the grouped call reaches about 90% (benchmarks/expert_sweep.py).
# - "fixed" (never picked by "auto"): the padded layout (FIXED_TILE rows) and our own tiled
#   GEMM kernel, whose every output sums over k in one fixed order: a token's result has the
#   same bits whatever the batch or chunk it comes in. No host synchronization; several times
#   slower than cuBLAS at large T (fp32 FMAs, no tensor cores).
# - "syncfree": offsets and the active-expert list by a device scan, then tensor-core GEMMs on
#   a worst-case grid (syncfree.py). No host synchronization. "auto" (and graphs) pick it
#   above pairs_max pairs while its stream kernel serves (under 13 pairs per expert,
#   syncfree.STREAM_PAIRS_PER_EXPERT; LongCat-Flash bf16: 11 to 554 tokens): each active expert's
#   weights read once; x the floor at 32 / 64 / 128 tokens 1.03 / 1.00 / 1.03 where the
#   uniform cuBLAS tile took 1.13 / 1.06 / 1.04 (H200, bf16, same run).
# - "capacity": blocks of C rows for every expert, C fixed by T, K and E; two cuBLAS batched
#   calls over all experts, overflow spilled to "syncfree". No host synchronization
#   (capacity.py). "auto" and graphs pick it for bf16 from 13 pairs per expert while C <= 64
#   (LongCat-Flash: 555 to 1742 tokens).


def _expert_mlp_gpu(x, topk_ids, w13, w2, expert_counts, allow_tf32, mark, strategy):
    cp = cupy_module()
    T, H = x.shape
    K = topk_ids.shape[1]
    ids = cp.ascontiguousarray(topk_ids, dtype=np.int32)
    x = with_unit_row_layout(x)
    w13 = cp.ascontiguousarray(w13)
    w2 = cp.ascontiguousarray(w2)
    if strategy == "auto" and T * K <= pairs_max(dtype_name(x.dtype)):
        strategy = "pairs"
    if (strategy == "auto" and syncfree.stream_tiles(T * K, w13.shape[0])
            and syncfree.tensor_core_ready(x, w13, w2)):
        strategy = "syncfree"
    if (strategy == "auto" and capacity.prefers(T, K, w13.shape[0])
            and capacity.capacity_ready(x, w13, w2)):
        strategy = "capacity"
    if strategy == "pairs":
        if T * K > 65535:
            raise ValueError(f"strategy='pairs': expected T * K <= 65535 (token, slot) pairs, "
                             f"got {T * K}")
        return pairs.pairs(x, ids, w13, w2, mark)
    if strategy == "fixed":
        return fixed.fixed(x, ids, w13, w2, expert_counts, mark)
    if strategy == "syncfree":
        return syncfree.syncfree(x, ids, w13, w2, expert_counts, mark)
    if strategy == "capacity":
        return capacity.capacity(x, ids, w13, w2, allow_tf32, mark)
    return grouped.grouped(x, ids, w13, w2, expert_counts, allow_tf32, mark, strategy)


