"""The real experts on the CPU (NumPy): pairs sorted by expert, one matmul per active expert.
With block scales (FP8 experts), the same loop evaluates docs/spec.md's FP8 math: weights
dequantized per 128x128 block, each GEMM's input quantized per row and 128 features, gate/up
rounded to x's dtype and h quantized straight from fp32."""
from __future__ import annotations

import numpy as np

from .._arrays import fixed_order_matmul
from ._common import ExpertOutput, rows_dtype

FP16_MAX = 65504.0


def _silu(v):
    """silu in v's dtype; silu(-inf) is its limit 0 (not -inf / inf = NaN: a gate past -65504
    in an fp16 layer's gate/up rows), as kernels/common.cuh's swiglu."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(v == -np.inf, np.float32(0), v / (np.float32(1) + np.exp(-v)))


def fp16_scaled(a):
    """(a rounded to fp16 after a per-row power-of-two scale 2^-e, 2^e per row): e is the
    least that brings the row's largest |a| to 65504 or below (0 for most rows); as the GPU's
    half_rows_scaled stores the activation of an fp16 layer. a: (M, I) fp32."""
    big = np.max(np.abs(a), axis=1) if a.shape[1] else np.zeros(a.shape[0], np.float32)
    e = np.zeros(a.shape[0], np.int32)
    over = (big > FP16_MAX) & np.isfinite(big)
    if over.any():
        e[over] = np.maximum(0, np.frexp(big[over])[1] - 1 - 15)
        e[over] += np.ldexp(big[over], -e[over]) > FP16_MAX
    scale = np.ldexp(np.float32(1), e).astype(np.float32)
    return (a / scale[:, None]).astype(np.float16), scale


def expert_mlp_numpy(x, topk_ids, w13, w2, mark, fixed_order=False, scales=None):
    """``scales``: None, or (w13_scale_inv, w2_scale_inv) with w13 / w2 e4m3.

    NaN or Inf in a row of x gives NaN (or Inf) in that pair's rows, as documented, and no
    NumPy RuntimeWarning: the floating-point flags are ignored for the expert math."""
    with np.errstate(all="ignore"):
        return _expert_mlp_numpy(x, topk_ids, w13, w2, mark, fixed_order, scales)


def _expert_mlp_numpy(x, topk_ids, w13, w2, mark, fixed_order, scales):
    from ..quant import dequantize_weight, fake_quantize_activations
    if scales is None:
        def weight(w, s, e, glu):
            return w[e].astype(np.float32)

        def act(a):
            return a
        scales = (None, None)
    else:
        def weight(w, s, e, glu):
            return dequantize_weight(w[e], s[e], glu=glu)

        act = fake_quantize_activations
    fp8 = scales[0] is not None
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
        gate_up[s:t] = matmul(act(xs[s:t]), weight(w13, scales[0], e, True).T)
    gate_up = gate_up.astype(x.dtype).astype(np.float32)  # rounded as the GPU stores it
    mark("gemm1")
    a = _silu(gate_up[:, :I]) * gate_up[:, I:]
    # Stored as the GPU's cuBLAS paths store it; fp16 rows get a power-of-two scale where the
    # activation passes 65504, and their outputs stay fp32 (rows_dtype), so that neither
    # overflows where y does not. FP8 quantizes h from fp32 (docs/spec.md).
    row_scale = None
    if fp8:
        h = a
    elif x.dtype == np.float16:
        h16, row_scale = fp16_scaled(a)
        h = h16.astype(np.float32)
    else:
        h = a.astype(x.dtype).astype(np.float32)
    mark("activation")
    rows = np.empty((order.size, H), rows_dtype(x.dtype))
    for e, s, t in blocks:
        rows[s:t] = matmul(act(h[s:t]), weight(w2, scales[1], e, False).T)
    if row_scale is not None:
        rows *= row_scale[:, None]
    mark("gemm2")
    return ExpertOutput(rows, slot_rows.reshape(T, K))
