"""FP8 experts on the GPU (SPEC.md "FP8 experts"): e4m3 weights (uint8 bits) with fp32 block
scales, activations quantized per row and 128 features.

- Few pairs (T*K <= PAIRS_MAX), and the deterministic mode: the pair kernel (kernels/fp8.cu
  pair_gemv_fp8) reads the weight bytes and their scales straight from the routing ids,
  quantizing x (GEMM 1) and h (GEMM 2, kept in fp32 between the passes) inside the warp that
  reads them. No host synchronization; a token's result does not depend on its batch.
- More: the padded layout (experts/_common.gather), the activations quantized by a small
  kernel, and one cuBLASLt block-scaled FP8 GEMM per active expert and GEMM (FP8 tensor
  cores; H and I multiples of 128, compute capability >= 8.9). Where that is not available, or
  cuBLASLt refuses, the same layout with each expert's weights dequantized to x's dtype and the
  quantized activations rounded to x's dtype (a' = q * sa), through the existing cuBLAS GEMMs.
  ``LT_REFUSAL`` keeps why cuBLASLt was not used (None while it is).
"""
from __future__ import annotations

import numpy as np

from .. import _cublas, quant
from .._arrays import DTYPES, cupy_module, dtype_name, with_unit_row_layout
from ._common import (MAX_TILE, PAD_ROWS, PAIR_ROWS, PAIR_WARPS, PAIRS_MAX, ExpertOutput,
                      experts_module, gather, real_counts, tile_plan)

LT_REFUSAL: str | None = None
_NULL = np.uint64(0)


def expert_mlp_fp8(x, topk_ids, w13, w2, scales, expert_counts, mark, strategy):
    cp = cupy_module()
    T, H = x.shape
    K = topk_ids.shape[1]
    ids = cp.ascontiguousarray(topk_ids, dtype=np.int32)
    x = with_unit_row_layout(x)
    w13, w2 = (cp.ascontiguousarray(w).view(np.uint8) for w in (w13, w2))
    s13, s2 = (cp.ascontiguousarray(s, dtype=np.float32) for s in scales)
    if strategy == "fixed" or (strategy in ("auto", "pairs") and T * K <= PAIRS_MAX) \
            or strategy == "pairs":
        return pairs_fp8(x, ids, w13, s13, w2, s2, mark)
    return gemm_fp8(x, ids, w13, s13, w2, s2, expert_counts, mark)


def pairs_fp8(x, ids, w13, s13, w2, s2, mark):
    """The pair kernel over every (token, slot) pair, launched in chunks of whole tokens
    (a launch takes at most 65535 pairs)."""
    cp = cupy_module()
    T, H = x.shape
    E, I = w13.shape[0], w13.shape[1] // 2
    K = ids.shape[1]
    P = T * K
    ctype = DTYPES[dtype_name(x.dtype)][1]
    mod = quant.fp8_module()
    slot_rows = cp.empty((T, K), np.int32)
    h = cp.empty((P, I), np.float32)  # fp32: h is quantized from fp32 (SPEC.md)
    rows = cp.empty((P, H), x.dtype)
    mark("permute")
    x_stride = x.strides[0] // x.itemsize
    chunk = 65535 // K * K
    passes = ((True, x, x_stride, K, w13, s13, I, H, h, f"{ctype},{ctype},float"),
              (False, h, I, 1, w2, s2, H, I, rows, f"{ctype},float,{ctype}"))
    for glu, src, stride, div, W, S, N, Kd, out, types in passes:
        vec = (Kd % 16 == 0 and (stride * src.itemsize) % 16 == 0 and src.data.ptr % 16 == 0
               and W.data.ptr % 16 == 0)
        R = PAIR_ROWS[glu]
        kernel = mod.get_function(
            f"pair_gemv_fp8<{types},{R},{str(glu).lower()},{str(vec).lower()}>")
        for p0 in range(0, P, chunk):
            n = min(chunk, P - p0)
            kernel((-(-N // (PAIR_WARPS * R)), n), (32 * PAIR_WARPS,),
                   (src, np.int64(stride), np.int32(div), ids, np.int32(E), W, S, np.int32(N),
                    np.int32(Kd), out, slot_rows, np.int64(p0)))
        if glu:
            mark("gemm1")
            mark("activation")  # fused into the first pass
    mark("gemm2")
    return ExpertOutput(rows, slot_rows)


def _lt_usable(H: int, I: int) -> bool:
    global LT_REFUSAL
    cp = cupy_module()
    if LT_REFUSAL is not None:
        return False
    cc = cp.cuda.Device().compute_capability  # "90", "89", "120"
    major, minor = cc[:-1], cc[-1]
    if (int(major), int(minor)) < (8, 9):
        LT_REFUSAL = (f"compute capability {major}.{minor} has no FP8 tensor cores (8.9 or "
                      f"newer needed)")
        return False
    if H % 128 or I % 128:
        return False  # shape rule of the block-scaled GEMM (not a refusal: other layers may fit)
    return True


def gemm_fp8(x, ids, w13, s13, w2, s2, expert_counts, mark):
    global LT_REFUSAL
    cp = cupy_module()
    T, H = x.shape
    E, I = w13.shape[0], w13.shape[1] // 2
    ctype = DTYPES[dtype_name(x.dtype)][1]
    mod, qmod = experts_module(), quant.fp8_module()
    counts = real_counts(ids, expert_counts, E)
    counts_host = counts.get().astype(np.int64)  # the one host synchronization of the pass
    active = np.nonzero(counts_host)[0]
    # Rows of each expert padded to PAD_ROWS: cuBLASLt wants M a multiple of 4 (and 16-byte
    # aligned rows), and every active expert is one GEMM.
    starts, rows_total, _ = tile_plan(counts_host, PAD_ROWS, MAX_TILE)
    padded = -(-counts_host // PAD_ROWS) * PAD_ROWS
    offsets, slot_rows, xs = gather(mod, ctype, x, ids, counts, E, PAD_ROWS, rows_total)
    gate_up = cp.empty((rows_total, 2 * I), x.dtype)
    rows = cp.empty((rows_total, H), x.dtype)
    mark("permute")
    if rows_total == 0:
        for stage in ("gemm1", "activation", "gemm2"):
            mark(stage)
        return ExpertOutput(rows, slot_rows)
    grid_rows = -(-rows_total // 4)
    if _lt_usable(H, I):
        xq = cp.empty((rows_total, H), np.uint8)
        xsc = cp.empty(rows_total * (H // 128), np.float32)
        qmod.get_function(f"quantize_rows<{ctype}>")(
            (H // 128, grid_rows), (128,),
            (xs, np.int32(rows_total), np.int32(H), offsets, np.int32(E), xq, xsc, _NULL))
        hq = cp.empty((rows_total, I), np.uint8)
        hsc = cp.empty(rows_total * (I // 128), np.float32)
        try:
            for e in active:
                s, m = starts[e], int(padded[e])
                _cublas.fp8_gemm_nt(w13[e], s13[e], xq[s:s + m], xsc[s * (H // 128):],
                                    gate_up[s:s + m], m)
            mark("gemm1")
            qmod.get_function(f"silu_mul_quantize<{ctype}>")(
                (I // 128, grid_rows), (128,),
                (gate_up, np.int32(rows_total), np.int32(I), offsets, np.int32(E), hq, hsc,
                 _NULL))
            mark("activation")
            for e in active:
                s, m = starts[e], int(padded[e])
                _cublas.fp8_gemm_nt(w2[e], s2[e], hq[s:s + m], hsc[s * (I // 128):],
                                    rows[s:s + m], m)
            mark("gemm2")
            return ExpertOutput(rows, slot_rows)
        except _cublas.CublasLtError as exc:
            LT_REFUSAL = f"cuBLASLt block-scaled FP8 GEMM refused: {exc}"
    # Fallback: dequantized weights (x's dtype) and a' = q * sa rounded to x's dtype.
    xd = cp.empty_like(xs)
    qmod.get_function(f"quantize_rows<{ctype}>")(
        ((H + 127) // 128, grid_rows), (128,),
        (xs, np.int32(rows_total), np.int32(H), offsets, np.int32(E), _NULL, _NULL, xd))
    for e in active:
        s, n = starts[e], int(counts_host[e])
        W = quant.dequantize_weight(w13[e], s13[e], glu=True, dtype=x.dtype)
        _cublas.gemm_nt(W, xd[s:s + n], gate_up[s:s + n])
    mark("gemm1")
    hd = cp.empty((rows_total, I), x.dtype)
    qmod.get_function(f"silu_mul_quantize<{ctype}>")(
        ((I + 127) // 128, grid_rows), (128,),
        (gate_up, np.int32(rows_total), np.int32(I), offsets, np.int32(E), _NULL, _NULL, hd))
    mark("activation")
    for e in active:
        s, n = starts[e], int(counts_host[e])
        W = quant.dequantize_weight(w2[e], s2[e], glu=False, dtype=x.dtype)
        _cublas.gemm_nt(W, hd[s:s + n], rows[s:s + n])
    mark("gemm2")
    return ExpertOutput(rows, slot_rows)
