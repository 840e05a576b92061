"""The "fixed" path (deterministic mode): the padded layout (FIXED_TILE rows) and our own tiled
GEMM, whose every output sums over k in one fixed order, so a token's result has the same bits
in any batch. No host synchronization; fp32 FMAs, no tensor cores."""
from __future__ import annotations

import numpy as np

from .._arrays import DTYPES, cupy_module, dtype_name
from ._common import (FIXED_TILE, ExpertOutput, experts_module, gather, out_ctype, real_counts,
                      rows_dtype, silu_mul)


def fixed(x, ids, w13, w2, expert_counts, mark):
    cp = cupy_module()
    T, H = x.shape
    E, I2 = w13.shape[0], w13.shape[1]
    I = I2 // 2
    K = ids.shape[1]
    ctype = DTYPES[dtype_name(x.dtype)][1]
    mod = experts_module()
    counts = real_counts(ids, expert_counts, E)
    # Rows: each expert's block rounded up to whole tiles. A bound known without the counts
    # on the host: at most T*K real pairs plus under FIXED_TILE padding per active expert,
    # and a whole number of tiles (the blocks' total is one).
    pairs = T * K
    rows_bound = (pairs + min(E, pairs) * (FIXED_TILE - 1)) // FIXED_TILE * FIXED_TILE
    offsets, slot_rows, xs = gather(mod, ctype, x, ids, counts, E, FIXED_TILE, rows_bound)
    gate_up = cp.empty((rows_bound, I2), x.dtype)
    # fp16 layers keep the activation and the rows in fp32 (rows_dtype)
    h = cp.empty((rows_bound, I), rows_dtype(x.dtype))
    rows = cp.empty((rows_bound, H), rows_dtype(x.dtype))
    o = out_ctype(ctype)
    mark("permute")
    tiles = rows_bound // FIXED_TILE
    if tiles == 0:
        for stage in ("gemm1", "activation", "gemm2"):
            mark(stage)
        return ExpertOutput(rows, slot_rows)
    mod.get_function(f"fixed_gemm_nt<{ctype},{ctype},{ctype}>")(
        (-(-I2 // FIXED_TILE), tiles), (256,),
        (xs, w13, gate_up, offsets, np.int32(E), np.int32(I2), np.int32(H)))
    mark("gemm1")
    silu_mul(mod, ctype, gate_up, h, rows_bound, I)
    mark("activation")
    mod.get_function(f"fixed_gemm_nt<{ctype},{o},{o}>")(
        (-(-H // FIXED_TILE), tiles), (256,),
        (h, w2, rows, offsets, np.int32(E), np.int32(H), np.int32(I)))
    mark("gemm2")
    return ExpertOutput(rows, slot_rows)
