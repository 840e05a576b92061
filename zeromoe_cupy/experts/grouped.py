"""The cuBLAS paths: "grouped" (one cublasGemmGroupedBatchedEx group per active expert) and
"padded" (each expert's rows padded to PAD_ROWS and cut into tiles, cublasGemmBatchedEx per
tile size; or, as "auto" picks it while no expert has more than UNIFORM_MAX_ROWS rows, every
active expert padded to one uniform tile: one batched call per GEMM). Both lay the rows out by
a device scan of the counts and copy the per-expert counts to the host once (cuBLAS wants
group sizes there)."""
from __future__ import annotations

import numpy as np

from .. import _cublas
from .._arrays import DTYPES, cupy_module, dtype_name
from ._common import (MAX_TILE, PAD_ROWS, PADDED_MIN_ROWS, UNIFORM_MAX_ROWS, ExpertOutput,
                      experts_module, gather, half_rows_scaled, real_counts, rows_dtype,
                      scale_rows, silu_mul, tile_plan)


def grouped(x, ids, w13, w2, expert_counts, allow_tf32, mark, strategy):
    cp = cupy_module()
    T, H = x.shape
    E, I2 = w13.shape[0], w13.shape[1]
    I = I2 // 2
    name = dtype_name(x.dtype)
    ctype = DTYPES[name][1]
    mod = experts_module()
    counts = real_counts(ids, expert_counts, E)
    counts_host = counts.get().astype(np.int64)  # the one host synchronization of the pass
    active = np.nonzero(counts_host)[0]
    M = int(counts_host.sum())
    item = x.itemsize
    # cuBLAS's grouped and batched calls want 16-byte aligned matrices: rows of H or I elements
    # keep that only when H and I are multiples of 16 bytes' worth of elements.
    aligned = (H * item) % 16 == 0 and (I * item) % 16 == 0
    pad, max_tile = PAD_ROWS, MAX_TILE
    if strategy == "auto":
        most = int(counts_host.max()) if counts_host.size else 0
        if aligned and active.size and most <= UNIFORM_MAX_ROWS:
            strategy = "padded"  # one uniform tile: every active expert padded to `most`
            pad = max_tile = -(-most // 8) * 8
        else:
            strategy = "padded" if (aligned and active.size
                                    and M >= PADDED_MIN_ROWS * active.size) else "grouped"
    if strategy == "padded" and not aligned:
        strategy = "grouped"  # the per-expert fallback below serves odd sizes
    if strategy != "padded":
        pad = 1
    starts, rows_total, tiles = tile_plan(counts_host, pad, max_tile)
    offsets, slot_rows, xs = gather(mod, ctype, x, ids, counts, E, pad, rows_total)
    gate_up = cp.empty((rows_total, I2), x.dtype)
    h = cp.empty((rows_total, I), x.dtype)
    # fp16: rows in fp32 from the half GEMM, and h rows scaled by a power of two where
    # silu(gate) * up passes 65504, undone on the GEMM output (half_rows_scaled, scale_rows)
    rows = cp.empty((rows_total, H), rows_dtype(x.dtype))
    scaled = name == "float16"
    out_name = "float32" if scaled else name

    def activation():
        if scaled:
            return half_rows_scaled(mod, gate_up, h, rows_total, I)
        silu_mul(mod, ctype, gate_up, h, rows_total, I)
        return None

    mark("permute")
    if M == 0:
        for stage in ("gemm1", "activation", "gemm2"):
            mark(stage)
        return ExpertOutput(rows, slot_rows)

    def pointers(experts, row_starts):
        """Device pointer arrays (weights, inputs, outputs) of GEMM 1 and of GEMM 2 for
        matrices of the given experts starting at the given rows."""
        return [cp.asarray(np.stack([W.data.ptr + experts * (W.size // E * item),
                                     src.data.ptr + row_starts * (src.shape[1] * src.itemsize),
                                     dst.data.ptr + row_starts * (dst.shape[1] * dst.itemsize)])
                           .astype(np.uint64)) for W, src, dst in ((w13, xs, gate_up),
                                                                   (w2, h, rows))]

    def per_expert_gemm2(experts):
        for e in experts:
            s, n = starts[e], counts_host[e]
            _cublas.gemm_nt(w2[e], h[s:s + n], rows[s:s + n], allow_tf32)

    if strategy == "padded":
        tiles = [(size, pointers(e, r)) for size, e, r in tiles]
        for size, p in tiles:
            _cublas.batched_gemm_nt(p[0][0], p[0][1], p[0][2], size, I2, H, name, allow_tf32)
        mark("gemm1")
        row_scale = activation()
        mark("activation")
        try:
            for size, p in tiles:
                _cublas.batched_gemm_nt(p[1][0], p[1][1], p[1][2], size, H, I, name, allow_tf32,
                                        out_name)
        except _cublas.CublasError:  # fp16 in, fp32 out refused: one GEMM per expert
            per_expert_gemm2(np.nonzero(counts_host)[0])
    elif aligned and _cublas.has_grouped_gemm():
        p = pointers(active, starts[active])
        m = counts_host[active]
        _cublas.grouped_gemm_nt(p[0][0], p[0][1], p[0][2], m, I2, H, name, allow_tf32)
        mark("gemm1")
        row_scale = activation()
        mark("activation")
        try:
            _cublas.grouped_gemm_nt(p[1][0], p[1][1], p[1][2], m, H, I, name, allow_tf32,
                                    out_name)
        except _cublas.CublasError:  # fp16 in, fp32 out refused: one GEMM per expert
            per_expert_gemm2(active)
    else:  # odd sizes, or cuBLAS < 12.5: one cublasGemmEx per active expert
        for e in active:
            s, n = starts[e], counts_host[e]
            _cublas.gemm_nt(w13[e], xs[s:s + n], gate_up[s:s + n], allow_tf32)
        mark("gemm1")
        row_scale = activation()
        mark("activation")
        per_expert_gemm2(active)
    if row_scale is not None:
        scale_rows(mod, rows, row_scale)
    mark("gemm2")
    return ExpertOutput(rows, slot_rows)
