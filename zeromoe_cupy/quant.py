"""FP8 block quantization (docs/spec.md "FP8 experts"), NumPy and CuPy.

e4m3 here is float8_e4m3fn (no infinities, max 448). On the host an e4m3 array is an
``ml_dtypes.float8_e4m3fn`` array; on the GPU (CuPy has no float8 dtype) it is a uint8 array
holding the same bits. Every rounding is from fp32, to nearest even, saturating at +-448.

Weights: a matrix [N, K] has one fp32 ``scale_inv`` per 128x128 block,
[ceil(N/128), ceil(K/128)]; ``W = q * scale_inv``. A fused gate/up matrix [2I, K] is two
matrices blocked separately (``glu=True``): its scales are [2 * ceil(I/128), ceil(K/128)].
Activations: per row and per group of 128 consecutive features, ``sa = max(max|a|, 1e-10) /
448``, ``a' = e4m3(a / sa) * sa``.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from ._arrays import cupy_module, is_cupy
from ._compile import memoize_per_device, optin_shared_bytes, raw_module

BLOCK = 128
E4M3_MAX = 448.0
ACT_EPS = 1e-10
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


# Every e4m3 byte's value in fp32 (exact): a lookup is several times faster than ml_dtypes' cast
_E4M3_F32 = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)


def blocks(n: int) -> int:
    """ceil(n / 128): the number of 128-wide blocks that cover n."""
    return -(-n // BLOCK)


def scale_shape(shape, glu: bool) -> tuple:
    """The scale_inv shape of a weight of ``shape`` [..., N, K] ([..., 2I, K] if glu)."""
    *lead, n, k = shape
    if glu:
        return (*lead, 2 * blocks(n // 2), blocks(k))
    return (*lead, blocks(n), blocks(k))


def is_e4m3(a) -> bool:
    """True for arrays that hold e4m3 values: ml_dtypes float8_e4m3fn, or uint8 bits."""
    return a.dtype == E4M3 or a.dtype == np.uint8


def e4m3_from_f32(v: np.ndarray) -> np.ndarray:
    """float32 -> float8_e4m3fn, round to nearest even, saturating at +-448 (NaN stays NaN).
    ml_dtypes' cast gives NaN past the largest finite value, hence the clip first."""
    v = np.asarray(v, np.float32)
    with np.errstate(invalid="ignore"):  # NaN casts to NaN, which is what it should give
        return np.clip(v, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def _matrices(shape, glu):
    """(count, rows, cols) of the separately blocked matrices in a [..., N, K] weight."""
    *lead, n, k = shape
    count = int(np.prod(lead, dtype=np.int64)) * (2 if glu else 1)
    return count, (n // 2 if glu else n), k


def quantize_weight(w, glu: bool = False, name: str = "w"):
    """(q, scale_inv) of a weight [..., N, K] (NumPy or CuPy; bf16/fp16/fp32).

    Per 128x128 block, in fp32: scale_inv = max|W| / 448 (1 where that is 0), q = e4m3(W /
    scale_inv). ``glu``: the rows are gate then up ([..., 2I, K]), blocked separately.
    Returns q (NumPy: float8_e4m3fn; CuPy: uint8 bits) of w's shape and fp32 scales
    ``scale_shape(w.shape, glu)``. Raises ValueError for non-finite weights (naming ``name``
    and the first matrix [..., N, K] holding one) or an odd 2I.
    """
    if w.ndim < 2:
        raise ValueError(f"w: expected a weight [..., N, K], got shape {tuple(w.shape)}")
    if glu and w.shape[-2] % 2:
        raise ValueError(f"w: expected an even number of rows (gate and up), got {w.shape[-2]}")
    count, n, k = _matrices(w.shape, glu)
    if is_cupy(w):
        q, s = _quantize_weight_gpu(w, count, n, k, name, glu)
    else:
        q, s = _quantize_weight_numpy(np.asarray(w), count, n, k, name, glu)
    return q.reshape(w.shape), s.reshape(scale_shape(w.shape, glu))


def _not_finite(name, i, glu):
    """The ValueError for non-finite values in matrix i of _matrices' order."""
    where = f"expert {i // 2} ({'gate' if i % 2 == 0 else 'up'} rows)" if glu else f"matrix {i}"
    return ValueError(f"{name}: expected finite weights, got NaN or Inf in {where}")


def _quantize_weight_numpy(w, count, n, k, name, glu):
    mats = w.reshape(count, n, k)
    q = np.empty((count, n, k), E4M3)
    s = np.empty((count, blocks(n), blocks(k)), np.float32)
    for i in range(count):
        m = mats[i].astype(np.float32)
        if not np.isfinite(m).all():
            raise _not_finite(name, i, glu)
        padded = np.zeros((blocks(n) * BLOCK, blocks(k) * BLOCK), np.float32)
        padded[:n, :k] = np.abs(m)
        amax = padded.reshape(blocks(n), BLOCK, blocks(k), BLOCK).max(axis=(1, 3))
        si = amax / np.float32(E4M3_MAX)
        si[si == 0] = 1  # a zero block, or an amax so small that the quotient underflows
        s[i] = si
        full = np.repeat(np.repeat(si, BLOCK, 0), BLOCK, 1)[:n, :k]
        q[i] = e4m3_from_f32(m / full)
    return q, s


def dequantize_weight(q, scale_inv, glu: bool = False, dtype=np.float32):
    """W = q * scale_inv per 128x128 block, computed in fp32 and returned in ``dtype``.
    q: float8_e4m3fn (NumPy) or uint8 e4m3 bits (NumPy or CuPy) [..., N, K]."""
    count, n, k = _matrices(q.shape, glu)
    s = scale_inv.reshape(count, blocks(n), blocks(k))
    if is_cupy(q):
        cp = cupy_module()
        out = cp.empty((count, n, k), dtype)
        for i in range(count):
            w = e4m3_to_f32(q.reshape(count, n, k)[i])
            full = cp.repeat(cp.repeat(s[i], BLOCK, 0), BLOCK, 1)[:n, :k]
            out[i] = (w * full).astype(dtype)
        return out.reshape(q.shape)
    q = np.asarray(q)
    vals = e4m3_to_f32(q).reshape(count, n, k)  # a new fp32 array
    s = np.asarray(s, np.float32)
    for b in range(blocks(n)):  # one 128-row slab at a time: no full-size scale array
        vals[:, b * BLOCK:(b + 1) * BLOCK] *= np.repeat(s[:, b], BLOCK, 1)[:, None, :k]
    return vals.astype(dtype, copy=False).reshape(q.shape)


def quantize_activations(a):
    """(q, sa) of activations a [M, K] (NumPy, any float dtype, rounded from fp32): per row and
    128-feature group g, sa[m, g] = max(max|a|, 1e-10) / 448 (fp32) and q = e4m3(a / sa).
    q: float8_e4m3fn [M, K]; sa: fp32 [M, ceil(K/128)]."""
    a = np.asarray(a).astype(np.float32)
    M, K = a.shape
    G = blocks(K)
    padded = np.zeros((M, G * BLOCK), np.float32)
    padded[:, :K] = a
    amax = np.abs(padded).reshape(M, G, BLOCK).max(axis=2)
    sa = np.maximum(amax, np.float32(ACT_EPS)) / np.float32(E4M3_MAX)
    q = e4m3_from_f32(a / np.repeat(sa, BLOCK, 1)[:, :K])
    return q, sa


def fake_quantize_activations(a) -> np.ndarray:
    """a' = e4m3(a / sa) * sa in fp32 (see quantize_activations)."""
    q, sa = quantize_activations(a)
    return q.astype(np.float32) * np.repeat(sa, BLOCK, 1)[:, :q.shape[1]]


# --- GPU ------------------------------------------------------------------------------------

def fp8_kernel_names() -> list[str]:
    """Every instantiation in kernels/fp8.cu that the GPU path may launch."""
    from ._arrays import DTYPES
    from .experts._common import PAIR_ROWS, out_ctype
    names = ["e4m3_encode", "e4m3_decode"]
    for _, (_, ctype) in DTYPES.items():
        o = out_ctype(ctype)  # GEMM 2's rows: fp32 for fp16 layers (rows_dtype)
        names += [f"quantize_blocks<{ctype}>", f"quantize_rows<{ctype}>",
                  f"quantize_pairs<{ctype}>", f"silu_mul_quantize<{ctype}>"]
        for vec in ("true", "false"):
            names += [f"pair_gemv_fp8<{ctype},float,{PAIR_ROWS[True]},true,{vec}>",
                      f"pair_gemv_fp8<{ctype},{o},{PAIR_ROWS[False]},false,{vec}>",
                      f"grouped_gemv_fp8<{ctype},float,{PAIR_ROWS[True]},true,{vec}>",
                      f"grouped_gemv_fp8<{ctype},{o},{PAIR_ROWS[False]},false,{vec}>"]
        names += [*(f"grouped_mma_fp8<{ctype},float,true,{e}>" for e in ("true", "false")),
                  *(f"grouped_mma_fp8<{ctype},{o},false,{e}>" for e in ("true", "false")),
                  *(f"pair_mma_fp8<{ctype},float,true,{ks}>" for ks in (1, 2)),
                  *(f"pair_mma_fp8<{ctype},{o},false,{ks}>" for ks in (1, 2)),
                  *(f"grouped_stream_fp8<{ctype},float,true,{nt}>" for nt in (1, 2)),
                  *(f"grouped_stream_fp8<{ctype},{o},false,{nt}>" for nt in (1, 2))]
    return names


# The tensor-core kernel's pipeline (kernels/fp8.cu grouped_mma_fp8, as -D options; its
# defaults there are FP8_PIPELINE): k bytes per stage, stages, L2 prefetch bytes of the weight
# loads. Chosen by benchmarks/expert_sweep.py (H200, LongCat-Flash): the fp8 layer at T = 64 /
# 128 / 1024 took 5.08 / 6.97 / 9.33 ms with this, 5.66 / 7.66 / 10.11 with (64, 4, 128), bits
# equal; the prefetch (with 64-byte stages) 5.52 / 7.55 / 9.90 ms against 5.79 / 7.93 / 10.16
# without. SMALL_FP8_PIPELINE: GPUs whose blocks cannot opt in to its 72 KB of shared memory.
FP8_PIPELINE = (("G8_BK", 128), ("G8_STAGES", 3), ("G8_PREFETCH", 128))
SMALL_FP8_PIPELINE = (("G8_BK", 64), ("G8_STAGES", 4), ("G8_PREFETCH", 128))


def fp8_smem_bytes(pipeline) -> int:
    """Dynamic shared memory of grouped_mma_fp8: its stages of (128 weight + 64 activation
    rows) x G8_BK bytes, at least its fp32 result tile (64 x 132 floats)."""
    p = dict(pipeline)
    return max(p["G8_STAGES"] * (128 + 64) * p["G8_BK"], 64 * 132 * 4)


@memoize_per_device
def fp8_pipeline():
    """FP8_PIPELINE where the current GPU's blocks can have its shared memory, else the small
    one."""
    small = fp8_smem_bytes(FP8_PIPELINE) > optin_shared_bytes()
    return SMALL_FP8_PIPELINE if small else FP8_PIPELINE


def fp8_module(pipeline=None):
    """kernels/fp8.cu, compiled once per device and pipeline (None: fp8_pipeline())."""
    return _fp8_module(pipeline or fp8_pipeline())


@memoize_per_device
def _fp8_module(pipeline):
    mma = [n for n in fp8_kernel_names() if n.startswith("grouped_mma_fp8")]
    return raw_module("fp8.cu", fp8_kernel_names(), tuple(f"-D{k}={v}" for k, v in pipeline),
                      dynamic_smem=(fp8_smem_bytes(pipeline), mma))


# kernels/fp8_wgmma.cu: the grouped FP8 GEMM on Hopper's wgmma (sm_90a code: compute
# capability 9.0 only). Its pipeline as -D options (its defaults there are WGMMA_PIPELINE):
# warpgroups per block that multiply (64 expert rows each), stages, work order (0: an expert's
# row tiles inner, 1: its feature chunks inner), k's per promoted partial sum of the gate/up
# GEMM, and a producer warpgroup (1: it alone copies the stages, handed over by mbarriers; 0:
# every thread copies, block-wide barriers between stages).
WGMMA_PIPELINE = (("WG_GROUPS", 1), ("WG_STAGES", 4), ("WG_ORDER", 0), ("WG_PROMOTE", 32),
                  ("WG_PRODUCER", 1))


def wgmma_threads(pipeline=WGMMA_PIPELINE) -> int:
    """Threads per block of grouped_wgmma_fp8: a warpgroup (128) per 64 expert rows, and one
    more with a producer."""
    p = dict(WGMMA_PIPELINE, **dict(pipeline))  # a key left out: the kernel's default
    return 128 * (p["WG_GROUPS"] + p["WG_PRODUCER"])


def wgmma_smem_bytes(pipeline=WGMMA_PIPELINE) -> int:
    """Dynamic shared memory of grouped_wgmma_fp8: its stages of (64 per warpgroup expert rows +
    128 weight rows) x 128 bytes, 1024 bytes to align the swizzled tiles, and with a producer
    two 8-byte mbarriers per stage."""
    p = dict(WGMMA_PIPELINE, **dict(pipeline))
    return p["WG_STAGES"] * ((64 * p["WG_GROUPS"] + 128) * 128 + 16 * p["WG_PRODUCER"]) + 1024


def wgmma_tile_rows(pipeline=WGMMA_PIPELINE) -> int:
    """Expert rows per tile of grouped_wgmma_fp8 without ROWS_N: 64 per multiplying warpgroup."""
    return 64 * dict(WGMMA_PIPELINE, **dict(pipeline))["WG_GROUPS"]


def wgmma_rows_n_sizes(pipeline=WGMMA_PIPELINE) -> tuple:
    """The ROWS_N tile heights grouped_wgmma_fp8 is built with in this pipeline (expert rows as
    wgmma's N; kernels/fp8_wgmma.cu): 16 and 32 with one multiplying warpgroup and the
    producer, else none."""
    p = dict(WGMMA_PIPELINE, **dict(pipeline))
    return (16, 32) if p["WG_GROUPS"] == 1 and p["WG_PRODUCER"] else ()


def fp8_wgmma_kernel_names(pipeline=WGMMA_PIPELINE) -> list[str]:
    """Every instantiation in kernels/fp8_wgmma.cu that the GPU path may launch."""
    from ._arrays import DTYPES
    from .experts._common import out_ctype
    names = ["wgmma_tile_plan"]
    for _, (_, ctype) in DTYPES.items():
        for rows_n in (0,) + wgmma_rows_n_sizes(pipeline):
            names += [f"grouped_wgmma_fp8<{ctype},float,true,{rows_n}>",
                      f"grouped_wgmma_fp8<{ctype},{out_ctype(ctype)},false,{rows_n}>"]
    return names


@memoize_per_device
def fp8_wgmma_module(pipeline=WGMMA_PIPELINE):
    """kernels/fp8_wgmma.cu for sm_90a (wgmma is an sm_90a feature: CuPy's own -arch=sm_90,
    which NVRTC also gets, does not enable it), compiled once per device and pipeline."""
    names = fp8_wgmma_kernel_names(pipeline)
    options = ("-arch=sm_90a",) + tuple(f"-D{k}={v}" for k, v in pipeline)
    return raw_module("fp8_wgmma.cu", names, options,
                      dynamic_smem=(wgmma_smem_bytes(pipeline), names[1:]))


def _launch_1d(name, n, args):
    blocks_ = int(min(max(1, -(-n // 256)), 132 * 16))
    fp8_module().get_function(name)((blocks_,), (256,), args)


def e4m3_from_f32_gpu(v):
    """CuPy float32 -> uint8 e4m3 bits (the e4m3 conversion of kernels/fp8.cu: round to
    nearest even, saturating at +-448, as ``e4m3_from_f32``)."""
    cp = cupy_module()
    v = cp.ascontiguousarray(v, dtype=np.float32)
    out = cp.empty(v.shape, np.uint8)
    _launch_1d("e4m3_encode", v.size, (v, out, np.int64(v.size)))
    return out


def e4m3_to_f32(q):
    """uint8 e4m3 bits (NumPy: or float8_e4m3fn) -> float32 (NumPy or CuPy)."""
    if not is_cupy(q):
        return _E4M3_F32[np.asarray(q).view(np.uint8)]
    cp = cupy_module()
    q = cp.ascontiguousarray(q)
    out = cp.empty(q.shape, np.float32)
    _launch_1d("e4m3_decode", q.size, (q, out, np.int64(q.size)))
    return out


def _quantize_weight_gpu(w, count, n, k, name, glu):
    from ._arrays import DTYPES, dtype_name
    cp = cupy_module()
    name = dtype_name(w.dtype)
    if name is None:
        raise TypeError(f"w: expected bfloat16, float16 or float32, got {w.dtype}")
    w = cp.ascontiguousarray(w)
    q = cp.empty((count, n, k), np.uint8)
    s = cp.empty((count, blocks(n), blocks(k)), np.float32)
    fp8_module().get_function(f"quantize_blocks<{DTYPES[name][1]}>")(
        (blocks(k), blocks(n), count), (256,), (w, q, s, np.int32(n), np.int32(k)))
    finite = cp.isfinite(s.reshape(count, -1)).all(axis=1)  # the kernel marks NaN / Inf blocks
    if not bool(finite.all()):
        raise _not_finite(name, int(cp.argmin(finite)), glu)
    return q, s
