"""The "pairs" path: a few tokens. One matrix-vector kernel per GEMM over the (token, slot)
pairs, reading the routing ids on the device: no permutation and no host synchronization."""
from __future__ import annotations

import numpy as np

from .._arrays import DTYPES, cupy_module, dtype_name, vector_width
from ._common import ExpertOutput, PAIR_ROWS, PAIR_WARPS, experts_module, rows_dtype


def pairs(x, ids, w13, w2, mark):
    cp = cupy_module()
    T, H = x.shape
    E, I2 = w13.shape[0], w13.shape[1]
    I = I2 // 2
    K = ids.shape[1]
    P = T * K
    ctype = DTYPES[dtype_name(x.dtype)][1]
    mod = experts_module()
    slot_rows = cp.empty((T, K), np.int32)
    # fp16 layers keep the activation and the rows in fp32 (rows_dtype)
    h = cp.empty((P, I), rows_dtype(x.dtype))
    rows = cp.empty((P, H), rows_dtype(x.dtype))
    o = "float" if rows.dtype == np.float32 else ctype
    mark("permute")
    if P:
        x_stride = x.strides[0] // x.itemsize
        for glu, src, stride, div, W, N, Kd, out in (
                (True, x, x_stride, K, w13, I, H, h), (False, h, I, 1, w2, H, I, rows)):
            vec = vector_width(x.itemsize, Kd, src, W, row_stride=stride)
            R = PAIR_ROWS[glu]
            grid = (-(-N // (PAIR_WARPS * R)), P)
            xt = ctype if glu else o
            mod.get_function(f"pair_gemv<{ctype},{xt},{o},{vec},{R},{str(glu).lower()}>")(
                grid, (32 * PAIR_WARPS,),
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
