"""Top-k routing (docs/spec.md, steps 1-7): NumPy on the CPU, one Numba CUDA kernel on CuPy arrays.

Shapes: logits (T, N) fp32 with N = E + Z; ids (T, K) int32; weights (T, K) fp32; counts (N,) int32.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

import math
import numbers

from ._arrays import (DTYPES, as_array, check_bool, check_int, cupy_module, dtype_name,
                      fixed_order_matmul, is_cupy, is_float_dtype, np_dtype,
                      with_unit_row_layout)
from ._compile import memoize_per_device, numba_kernel_as_cupy, raw_module

# Sizes the GPU kernel handles: a lane keeps 4 * ceil(N / 128) scores in registers, and K
# lanes of the warp write the K winners.
MAX_ROUTED_EXPERTS = 1024
MAX_TOP_K = 32
_WARPS_PER_BLOCK = 8
_SCORING_CODES = {"softmax": 0, "sigmoid": 1}
# Selection keys (both paths): fp32 values mapped to ints in their order, NaN below -inf
# (NAN: where a canonical NaN's bits land), and padding / dropped groups below everything.
KEY_SHIFT = 0x7FFFFF   # +inf -> 2**31 - 1, -inf -> -2**31 + 0xFFFFFE
KEY_NAN = -(2**31) + 0x7FFFFE
KEY_MASKED = -(2**31)
# grouped top-k: the key of the groups whose fp32 scores underflowed (_tiny_group_keys), that
# of the largest float below the smallest normal one
KEY_TINY = 0x800000 + KEY_SHIFT - 1


class RoutingResult(NamedTuple):
    """What the router chose. ids descend by selection score; weights are unbiased."""

    topk_ids: Any       # int32 [T, K]
    topk_weights: Any   # float32 [T, K], after renormalize and routed scaling
    expert_counts: Any  # int32 [E+Z]: (token, slot) pairs per expert


# x: (T, H) bf16/fp16/fp32; router_weight: (N, H); router_bias: (N,) -> (T, N) fp32
def router_logits(x, router_weight, router_bias=None, weight_parts=None,
                  fixed_order: bool = False):
    """L = fp32(x) @ Wr^T (+ br), in fp32 (no TF32).

    Args:
        x: [T, H] bfloat16, float16 or float32 (NumPy, CuPy or a DLPack tensor).
        router_weight: [E+Z, H], any float dtype (used in fp32), same array kind as x.
        router_bias: optional [E+Z] float.
        weight_parts: optional, for bfloat16 CuPy x: three bfloat16 arrays (hi, mid, lo),
            each [E+Z, H], with hi = bf16(Wr), mid = bf16(Wr - hi), lo = bf16(Wr - hi - mid).
            The product then runs as bf16 tensor-core GEMMs summed in fp32: x is exact in
            bf16 and the parts carry Wr's 24 mantissa bits, so every product is exact, and the
            leading part is summed in K-chunks to keep the error near an fp32 GEMM's.
        fixed_order: every logit summed in one order whatever the batch (a token gets the
            same bits alone or in any batch; slower). On the GPU a matrix-vector kernel (also
            used for up to 32 tokens without it); on the CPU ordered float64 sums.

    Returns:
        float32 [T, E+Z], same array module as x.

    Raises:
        TypeError: x not a bf16/fp16/fp32 array, a non-float weight, or mixed NumPy/CuPy.
        ValueError: wrong shapes (router_weight's width must be H).
    """
    x = as_array(x, "x")
    router_weight = as_array(router_weight, "router_weight")
    router_bias = as_array(router_bias, "router_bias", allow_none=True)
    if x.ndim != 2:
        raise ValueError(f"x: expected a 2-D array [T, H], got shape {tuple(x.shape)}")
    if dtype_name(x.dtype) is None:
        raise TypeError(f"x: expected bfloat16, float16 or float32, got {x.dtype}")
    H = x.shape[1]
    if router_weight.ndim != 2 or router_weight.shape[1] != H:
        raise ValueError(f"router_weight: expected shape [E+Z, H={H}], "
                         f"got {tuple(router_weight.shape)}")
    N = router_weight.shape[0]
    if router_bias is not None and tuple(router_bias.shape) != (N,):
        raise ValueError(f"router_bias: expected shape ({N},), got {tuple(router_bias.shape)}")
    for name, a in (("router_weight", router_weight), ("router_bias", router_bias)):
        if a is None:
            continue
        if not is_float_dtype(a.dtype):
            raise TypeError(f"{name}: expected a floating-point array, got {a.dtype}")
        if is_cupy(a) != is_cupy(x):
            raise TypeError(f"{name}: expected the same array kind as x "
                            f"({'CuPy' if is_cupy(x) else 'NumPy'}), got {type(a).__module__}")
    if weight_parts is not None:
        if not isinstance(weight_parts, (tuple, list)):
            raise TypeError(f"weight_parts: expected a tuple of three bfloat16 arrays (hi, mid, "
                            f"lo), got {type(weight_parts).__name__}")
        if len(weight_parts) != 3:
            raise ValueError(f"weight_parts: expected three arrays (hi, mid, lo), got "
                             f"{len(weight_parts)}")
        weight_parts = tuple(as_array(p, f"weight_parts[{i}]")
                             for i, p in enumerate(weight_parts))
        for i, p in enumerate(weight_parts):
            if p.dtype != np_dtype("bfloat16") or is_cupy(p) != is_cupy(x):
                raise TypeError(f"weight_parts[{i}]: expected a bfloat16 array of x's kind "
                                f"({'CuPy' if is_cupy(x) else 'NumPy'}), got {p.dtype} "
                                f"({type(p).__module__})")
            if tuple(p.shape) != (N, H):
                raise ValueError(f"weight_parts[{i}]: expected shape ({N}, {H}), got "
                                 f"{tuple(p.shape)}")
    fixed_order = check_bool("fixed_order", fixed_order)
    return compute_router_logits(x, router_weight, router_bias, weight_parts, fixed_order)


def compute_router_logits(x, router_weight, router_bias, weight_parts, fixed_order):
    """router_logits without the argument checks: for the layer, which checked x and owns
    the weights (this runs on every call)."""
    if (is_cupy(x) and (fixed_order or x.shape[0] <= ROUTER_GEMV_MAX_T)
            and dtype_name(x.dtype) is not None):
        return _router_gemv(x, router_weight, router_bias)
    if weight_parts is not None and is_cupy(x) and x.dtype == np_dtype("bfloat16"):
        logits = _router_bf16x3(x, weight_parts)
    else:
        x32 = x.astype(np.float32, copy=False)
        w32 = router_weight.astype(np.float32, copy=False)
        if is_cupy(x):
            logits = _router_fp32_gemm(x32, w32)
        else:
            with np.errstate(all="ignore"):  # NaN / Inf rows give NaN logits, quietly
                logits = fixed_order_matmul(x32, w32.T) if fixed_order else x32 @ w32.T
    if router_bias is not None:
        logits += router_bias.astype(np.float32, copy=False)
    return logits


# Up to this many tokens the matrix-vector kernel computes the logits (router_gemv reads W once
# per 8 tokens, the repeats from L2): per call, device time on an H200 at LongCat-Flash shapes
# (benchmarks/router_precision.py), T = 8 / 16 / 32 / 64: 0.030 / 0.041 / 0.061 / 0.115 ms,
# the fp32 GEMM with x's fp32 copy 0.068 / 0.071 / 0.070 / 0.072 ms (router.cu's split since
# then: 0.015 / 0.022 / 0.042 at 8 / 16 / 32, benchmarks/router_variants.py).
ROUTER_GEMV_MAX_T = 32
ROUTER_GEMV_BLOCK_T = 8  # kernels/router.cu MAXT: tokens per block (each block reads W once)
_ROUTER_GEMV_SPLIT, _ROUTER_GEMV_ROWS = 8, 1  # kernels/router.cu RG_SPLIT (warps per row), RG_ROWS
# Measured at H=6144 (H200), max error vs float64 over 256 of 16384 rows: 1.8e-6 (chunks of
# 1536), 6.2e-7 (512); the fp32 GEMM 3.2e-6, the unchunked product 7.9e-6.
BF16X3_CHUNK = 512


def router_kernel_names() -> list[str]:
    """Every instantiation in kernels/router.cu that router_logits may launch."""
    return [f"router_gemv<{ctype},{vec},{ROUTER_GEMV_BLOCK_T}>"
            for _, (dt, ctype) in DTYPES.items() for vec in (1, 4)]


@memoize_per_device
def _router_module():
    return raw_module("router.cu", router_kernel_names())


def _router_gemv(x, router_weight, router_bias):
    cp = cupy_module()
    T, H = x.shape
    N = router_weight.shape[0]
    w = cp.ascontiguousarray(router_weight, dtype=np.float32)
    bias = None if router_bias is None else cp.ascontiguousarray(router_bias, dtype=np.float32)
    x = with_unit_row_layout(x)
    x_stride = x.strides[0] // x.itemsize
    vec = 4 if (H % 4 == 0 and x_stride % 4 == 0 and w.data.ptr % 16 == 0
                and x.data.ptr % (4 * x.itemsize) == 0) else 1
    logits = cp.empty((T, N), np.float32)
    if T:
        ctype = DTYPES[dtype_name(x.dtype)][1]
        _router_module().get_function(f"router_gemv<{ctype},{vec},{ROUTER_GEMV_BLOCK_T}>")(
            (-(-N // _ROUTER_GEMV_ROWS), -(-T // ROUTER_GEMV_BLOCK_T)),
            (32 * _ROUTER_GEMV_SPLIT * _ROUTER_GEMV_ROWS,),
            (x, np.int64(x_stride), np.int32(T), w, np.int32(H), np.int32(N), bias, logits))
    return logits


def _router_fp32_gemm(x32, w32):
    # cuBLAS through our shim rather than cupy.matmul: CuPy refuses its own cuBLAS calls while
    # a stream is being captured into a CUDA graph (graphs.py); the GEMM is the same.
    from . import _cublas
    cp = cupy_module()
    logits = cp.empty((x32.shape[0], w32.shape[0]), np.float32)
    _cublas.gemm_nt(cp.ascontiguousarray(w32), with_unit_row_layout(x32), logits)
    return logits


def _router_bf16x3(x, weight_parts):
    from . import _cublas
    cp = cupy_module()
    x = with_unit_row_layout(x)
    hi, mid, lo = weight_parts
    logits = cp.empty((x.shape[0], hi.shape[0]), np.float32)
    if x.shape[0]:
        # smallest parts first; the leading part in K-chunks (see router_logits)
        _cublas.gemm_nt_bf16_f32_accumulate(
            [(lo, x, None), (mid, x, None), (hi, x, BF16X3_CHUNK)], logits)
    return logits


def split_bf16(w32):
    """Three bfloat16 arrays whose sum is the float32 array w32 to within 2**-24 relative
    (hi = bf16(w), mid = bf16(w - hi), lo = bf16(w - hi - mid)); NumPy or CuPy."""
    bf16 = np_dtype("bfloat16")
    hi = w32.astype(bf16)
    rest = w32 - hi.astype(np.float32)
    mid = rest.astype(bf16)
    lo = (rest - mid.astype(np.float32)).astype(bf16)
    return hi, mid, lo


def check_route_args(logits, top_k, scoring_func, correction_bias, num_expert_group, topk_group):
    """Host-side validation shared by both paths; raises ValueError/TypeError."""
    if logits.ndim != 2:
        raise ValueError(f"router_logits: expected a 2-D array [T, E+Z], got shape {logits.shape}")
    if logits.dtype != np.float32:
        raise TypeError(f"router_logits: expected a floating-point array, got {logits.dtype}")
    n = logits.shape[1]
    check_int("top_k", top_k)
    if not 0 < top_k <= n:
        raise ValueError(f"top_k: expected an int in [1, {n}], got {top_k!r}")
    if scoring_func not in _SCORING_CODES:
        raise ValueError(f"scoring_func: expected 'softmax' or 'sigmoid', got {scoring_func!r}")
    if correction_bias is not None:
        if correction_bias.shape != (n,):
            raise ValueError(f"e_score_correction_bias: expected shape ({n},), "
                             f"got {correction_bias.shape}")
        if is_cupy(correction_bias) != is_cupy(logits):
            raise TypeError("e_score_correction_bias: expected the same array kind as the "
                            "logits (NumPy or CuPy)")
    if (num_expert_group is None) != (topk_group is None):
        raise ValueError("num_expert_group and topk_group: expected both or neither")
    if num_expert_group is not None:
        check_int("num_expert_group", num_expert_group)
        check_int("topk_group", topk_group)
        if num_expert_group <= 0 or n % num_expert_group:
            raise ValueError(f"num_expert_group: expected a positive divisor of {n}, "
                             f"got {num_expert_group}")
        if not 0 < topk_group <= num_expert_group:
            raise ValueError(f"topk_group: expected in [1, {num_expert_group}], got {topk_group}")
        if top_k > topk_group * (n // num_expert_group):
            raise ValueError(f"top_k: expected <= topk_group * group size = "
                             f"{topk_group * (n // num_expert_group)}, got {top_k}")



def _renorm_code(renormalize) -> int:
    """0 (off), 1 (renormalize) or 2 ("drop_zero"); TypeError for anything else."""
    if isinstance(renormalize, (bool, np.bool_)):
        return int(bool(renormalize))
    if isinstance(renormalize, str) and renormalize == "drop_zero":
        return 2
    raise TypeError(f"renormalize: expected a bool or 'drop_zero', got "
                    f"{type(renormalize).__name__} {renormalize!r}")


def route(router_logits, top_k: int, *, scoring_func: str = "softmax",
          e_score_correction_bias=None, renormalize=False,
          routed_scaling_factor: float = 1.0, num_expert_group: int | None = None,
          topk_group: int | None = None, drop_experts=None,
          logits_norm_std: float | None = None) -> RoutingResult:
    """Choose K experts per token: ids = topk(score + bias), w = score[ids] (renormalized) * rsf.

    Args:
        router_logits: [T, E+Z], any float dtype (used in fp32).
        top_k: K, an int in [1, E+Z] (Python or NumPy integer).
        scoring_func: "softmax" or "sigmoid".
        e_score_correction_bias: optional fp32 [E+Z] (other float dtypes are converted):
            added to the scores to choose, never to weigh.
        renormalize: a bool (weights divided by their sum over the K slots) or "drop_zero":
            the slots of experts flagged in ``drop_experts`` weigh 0, the others are
            renormalized (all 0 when every slot is flagged).
        routed_scaling_factor: a finite float multiplying every weight.
        num_expert_group, topk_group: grouped top-k (both or neither; ints).
        drop_experts: bool [E+Z] (host sequence), with renormalize="drop_zero" only: the
            "zero"-type experts.
        logits_norm_std: sigma > 0 or None: the scores use L / (std(L) / sigma), std unbiased
            over a token's E+Z logits (a token whose std is 0 uses L; a non-finite logit
            makes the token's scores NaN). The GPU kernel normalizes each token itself.

    Returns:
        RoutingResult(topk_ids int32 [T, K] by descending selection score, topk_weights
        float32 [T, K], expert_counts int32 [E+Z]).

    NumPy logits run on the CPU; CuPy logits run the CUDA kernel on CuPy's current stream;
    both give the same ids. Inputs are never modified. Raises TypeError (kinds, dtypes) or
    ValueError (shapes, values) naming the argument.

    Ranking (docs/spec.md, "Routing rules"): ids descend by the fp32 s = score + bias
    (without a bias, by the logit: the same order, exact also where the fp32 score
    underflows). Among experts holding one finite fp32 s: if all have the same bias, the
    larger logit first (their exact order), then the lower id; otherwise the lower id (an
    exact tie between different biases goes to the lower id). A NaN s ranks below every
    number, -inf and -FLT_MAX included (a NaN logit makes its whole softmax row NaN).
    Grouped top-k with a bias compares groups by the fp32 sum of their two best s, equal
    sums to the lower group, except groups whose two best experts have bias 0 and whose fp32
    sum is below the smallest normal float (e.g. sigmoid logits below about -87): those rank
    below every larger sum and among themselves by their exact sums (from the log-scores),
    as in float64. Weights: the fp32
    score (0 where it underflows fp32, e.g. sigmoid(-110)); with ``renormalize``,
    exp(log p_k - max) / sum over the K chosen, finite whenever the chosen logits are, even
    when every chosen score underflows.
    """
    logits = as_array(router_logits, "router_logits")
    if logits.dtype != np.float32 and is_float_dtype(logits.dtype):  # any float, used as fp32
        logits = logits.astype(np.float32)
    bias = as_array(e_score_correction_bias, "e_score_correction_bias", allow_none=True)
    if bias is not None:
        if not is_float_dtype(bias.dtype):
            raise TypeError(f"e_score_correction_bias: expected a floating-point array, "
                            f"got {bias.dtype}")
        bias = bias.astype(np.float32, copy=False)
    check_route_args(logits, top_k, scoring_func, bias, num_expert_group, topk_group)
    renorm = _renorm_code(renormalize)
    drop = _drop_mask(drop_experts, renorm, logits.shape[1])
    if logits_norm_std is not None:
        check_norm_std(logits_norm_std)
    rsf = routed_scaling_factor
    if isinstance(rsf, bool) or not isinstance(rsf, numbers.Real):
        raise TypeError(f"routed_scaling_factor: expected a float, got {type(rsf).__name__} "
                        f"{rsf!r}")
    if not math.isfinite(rsf):
        raise ValueError(f"routed_scaling_factor: expected a finite number, got {rsf}")
    groups = None if num_expert_group is None else int(num_expert_group)
    topk_group = None if topk_group is None else int(topk_group)
    args = (int(top_k), scoring_func, bias, renorm, float(rsf), groups, topk_group, drop)
    if is_cupy(logits):  # the kernel normalizes each token's logits itself
        return _route_gpu(logits, *args, logits_norm_std)
    if logits_norm_std is not None:
        logits = normalize_logits(logits, logits_norm_std)
    return _route_numpy(logits, *args)


def _drop_mask(drop_experts, renorm, n):
    """drop_experts as a read-only host bool [n] array (None unless renormalize="drop_zero")."""
    if renorm != 2:
        if drop_experts is not None:
            raise ValueError("drop_experts: only used with renormalize='drop_zero', got "
                             "renormalize without it")
        return None
    if drop_experts is None:
        raise ValueError("drop_experts: required with renormalize='drop_zero' (a bool [E+Z] "
                         "sequence flagging the 'zero'-type experts), got None")
    if is_cupy(drop_experts):
        drop_experts = drop_experts.get()
    mask = np.asarray(drop_experts)
    if mask.dtype != np.bool_:
        raise TypeError(f"drop_experts: expected {n} bools (one per expert), got dtype "
                        f"{mask.dtype}")
    if mask.shape != (n,):
        raise ValueError(f"drop_experts: expected {n} bools (one per expert), got shape "
                         f"{mask.shape}")
    return mask


def check_norm_std(sigma) -> None:
    """TypeError for a bool or a non-number, ValueError for one that is not finite and > 0."""
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"logits_norm_std: expected a finite float > 0, got "
                        f"{type(sigma).__name__} {sigma!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"logits_norm_std: expected a finite float > 0, got {sigma!r}")


def normalize_logits(logits, sigma: float):
    """L / (std(L) / sigma) per row, in fp32, std unbiased; rows with std 0 (all logits equal)
    keep L. Computed as u * (sigma / std(u)) with u = L / max|L| (|u| <= 1), so that the
    squares neither overflow nor underflow fp32 at extreme logit scales; a row with a NaN or
    an infinite logit becomes NaN. The GPU routing kernel computes the same per token.
    logits: fp32 [T, N] NumPy or CuPy; returns a new array."""
    check_norm_std(sigma)
    xp = cupy_module() if is_cupy(logits) else np
    n = logits.shape[1]
    with np.errstate(all="ignore"):
        m = xp.abs(logits).max(axis=1, keepdims=True)  # NaN where the row has a NaN
        m = xp.where(m == 0, np.float32(1), m)  # all zero: u = L, std 0
        u = logits / m
        d = u - u.mean(axis=1, keepdims=True)
        std = xp.sqrt((d * d).sum(axis=1, keepdims=True) / np.float32(max(n - 1, 1)))
        # std(u) == 0 only where the logits are all equal (then u = +-1 and u * m = L).
        scale = xp.where(std == 0, m, np.float32(sigma) / std)
        return (u * scale).astype(np.float32, copy=False)


def _ordered(f):
    """int64 keys in the order of the fp32 values f (-0 == +0), NaN below -inf: the
    kernel's key_of (_route_kernel.py)."""
    bits = (f + np.float32(0)).view(np.int32).astype(np.int64)
    key = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + KEY_SHIFT
    return np.where(np.isnan(f), KEY_NAN, key)


def _tie_keys(key, f, logits, bias):
    """The second ranking key among equal finite selection keys (see _route_kernel.py): the
    logit's key where every choosable expert holding that key has the same bias (their
    logits are then their exact order), else 0 (the lower id decides)."""
    T, n = key.shape
    order = np.argsort(key, axis=1, kind="stable")  # equal keys side by side
    ks = np.take_along_axis(key, order, axis=1)
    bs = bias[order].ravel()
    start = np.ones((T, n), bool)
    start[:, 1:] = ks[:, 1:] != ks[:, :-1]
    first = np.flatnonzero(start)
    same = (np.minimum.reduceat(bs, first) == np.maximum.reduceat(bs, first)) if bs.size \
        else np.zeros(0, bool)
    uniform = np.empty((T, n), bool)
    np.put_along_axis(uniform, order, same[np.cumsum(start) - 1].reshape(T, n), axis=1)
    tie_ok = uniform & np.isfinite(f) & (key > KEY_MASKED)
    return np.where(tie_ok, _ordered(logits), 0)


def _tiny_group_keys(gkey, gscore, order, logits, bias, scoring_func, total, best):
    """Group keys where the fp32 group scores underflow: a group whose best ``best`` experts
    have bias 0 and whose fp32 score is below the smallest normal float holds p values
    that rounded to 0 or to subnormals, so fp32 cannot order such groups as their exact
    sums (docs/spec.md step 5: the float64 order). They share one key just below that
    float's and are ordered among themselves by log(sum of their best ``best`` p), from the
    log-scores (which do not underflow). Returns (keys, second keys: +inf elsewhere)."""
    T, groups, gs = order.shape[0], order.shape[1], logits.shape[1] // order.shape[1]
    tiny = np.float32(np.finfo(np.float32).tiny)
    chosen_bias = bias.reshape(groups, gs)[np.arange(groups)[None, :, None], order]
    cand = ((chosen_bias == 0).all(axis=2) & (gscore >= 0) & (gscore < tiny))
    exact = np.full(gkey.shape, np.inf)
    if not cand.any():
        return gkey, exact
    lp = log_scores_f32(logits, scoring_func, total).astype(np.float64)
    lp = np.where((bias == 0)[None, :], lp, -np.inf).reshape(T, groups, gs)
    top = -np.sort(-lp, axis=2)[:, :, :best]
    with np.errstate(all="ignore"):
        value = np.logaddexp.reduce(top, axis=2)
    return np.where(cand, KEY_TINY, gkey), np.where(cand, value, exact)


def sigmoid_f32(logits):
    """sigmoid in fp32 without a premature underflow: exp(l) / (1 + exp(l)) for l < 0, so
    sigmoid(-100) is its fp32 value 3.7e-44, not 1 / (1 + inf) = 0."""
    with np.errstate(all="ignore"):
        e = np.exp(-np.abs(logits))
        return (np.where(logits >= 0, np.float32(1), e) / (np.float32(1) + e)).astype(np.float32)


def log_scores_f32(logits, scoring_func, total):
    """log p in fp32 for the renormalized weights, finite for finite logits: log-sigmoid, or
    log-softmax up to its per-row constant (NaN throughout a row whose softmax sum ``total``
    is NaN, as its scores are)."""
    with np.errstate(all="ignore"):
        if scoring_func == "softmax":
            return logits + np.float32(0) * total
        return (np.minimum(logits, np.float32(0))
                - np.log1p(np.exp(-np.abs(logits)))).astype(np.float32)


def _route_numpy(logits, top_k, scoring_func, bias, renorm, rsf, groups, topk_group, drop):
    """The kernel's algorithm in NumPy (see _route_kernel.py for the ranking rule)."""
    T, n = logits.shape
    with np.errstate(all="ignore"):
        if scoring_func == "softmax":
            m = np.max(logits, axis=1, keepdims=True) if n else logits
            e = np.exp(logits - m)
            total = np.sum(e, axis=1, keepdims=True)
            p = e * (np.float32(1) / total)
        else:
            total = np.zeros((T, 1), np.float32)
            p = np.float32(1) / (np.float32(1) + np.exp(-logits))
        # The selection value: s = p + bias, or without a bias the logit (the same order as
        # p, and exact where p underflows; NaN throughout a softmax row holding a NaN).
        f = (p + bias[None, :] if bias is not None
             else logits + np.float32(0) * total).astype(np.float32)
    key = _ordered(f)
    if groups is not None:
        gs = n // groups
        best = min(2 if bias is not None else 1, gs)
        order = np.argsort(-key.reshape(T, groups, gs), axis=2, kind="stable")[:, :, :best]
        with np.errstate(all="ignore"):
            gscore = np.take_along_axis(f.reshape(T, groups, gs), order, axis=2).sum(axis=2)
        gkey = _ordered(gscore.astype(np.float32))
        exact = np.zeros(gkey.shape)
        if bias is not None:
            gkey, exact = _tiny_group_keys(gkey, gscore, order, logits, bias, scoring_func,
                                           total, best)
        keep = np.lexsort((-exact, -gkey), axis=1)[:, :topk_group]
        allowed = np.zeros((T, groups), bool)
        np.put_along_axis(allowed, keep, True, axis=1)
        key = np.where(np.repeat(allowed, gs, axis=1), key, KEY_MASKED)
    second = (_tie_keys(key, f, logits, bias) if bias is not None
              else np.zeros_like(key))
    ids = np.lexsort((-second, -key), axis=1)[:, :top_k].astype(np.int32)
    if renorm:
        lw = np.take_along_axis(log_scores_f32(logits, scoring_func, total), ids, axis=1)
        dropped = drop[ids] if renorm == 2 else np.zeros(ids.shape, bool)
        lw = np.where(dropped, -np.inf, lw)  # drop_zero: those slots weigh 0
        with np.errstate(all="ignore"):
            e = np.where(dropped, np.float32(0), np.exp(lw - np.max(lw, axis=1, keepdims=True)))
            total_w = np.sum(e, axis=1, keepdims=True)
            w = e / np.where(dropped.all(axis=1, keepdims=True), np.float32(1), total_w)
    elif scoring_func == "softmax":
        w = np.take_along_axis(p, ids, axis=1)
    else:
        w = sigmoid_f32(np.take_along_axis(logits, ids, axis=1))
    w = (w * np.float32(rsf)).astype(np.float32)
    counts = np.bincount(ids.ravel(), minlength=n).astype(np.int32)
    return RoutingResult(ids, w, counts)


# ----------------------------------------------------------------------------------------------
# The CUDA kernel lives in _route_kernel.py (imported lazily: it imports numba).

def route_kernel_signature():
    from numba import float32, int32, types
    f32p, i32p = types.CPointer(float32), types.CPointer(int32)
    # logits, bias, ids, weights, counts, drop (bit words), then T and the _static_args
    return (f32p, f32p, i32p, f32p, i32p, i32p, int32, int32, int32, int32, int32, float32,
            int32, int32, float32)


def route_launch_bounds(grouped: bool, n: int):
    """(threads, blocks per SM) for the kernel: each lane holds 4 * ceil(n / 128) scores in
    registers, so larger N gets fewer blocks and more registers a thread (no spills)."""
    scores = 4 * -(-n // 128)
    registers = -(-(scores + (48 if grouped else 32)) // 8) * 8  # allocated in steps of 8
    threads = 32 * _WARPS_PER_BLOCK
    return threads, max(2, min(64 // _WARPS_PER_BLOCK, 65536 // (threads * registers)))


@functools.lru_cache(maxsize=64)
def _static_args(top_k, scoring_func, has_bias, renorm, rsf, groups, topk_group, norm_std):
    """The kernel's scalar arguments after T, made once per routing configuration
    (renorm: 0 off, 1 renormalize, 2 drop_zero; norm_std 0: no logits normalization)."""
    return (np.int32(top_k), np.int32(_SCORING_CODES[scoring_func]), np.int32(has_bias),
            np.int32(renorm), np.float32(rsf), np.int32(groups or 0),
            np.int32(topk_group or 0), np.float32(norm_std or 0))


@memoize_per_device
def _route_function(grouped: bool, n: int):
    """The compiled kernel for this device, and its grid cap: the blocks the GPU runs at once."""
    from ._route_kernel import make_route_kernel
    threads, blocks_per_sm = route_launch_bounds(grouped, n)
    kernel = numba_kernel_as_cupy(make_route_kernel(grouped, n), route_kernel_signature(),
                                  launch_bounds=(threads, blocks_per_sm))
    sms = cupy_module().cuda.Device().attributes["MultiProcessorCount"]
    return kernel, sms * blocks_per_sm


def launch_route_kernel(kernel, logits, bias, ids, weights, counts, top_k, scoring_func,
                        renorm, rsf, groups, topk_group, launch, max_blocks=None, drop=None,
                        norm_std=None):
    """Launch a compiled route kernel; ``launch(kernel, grid, block, args, shared_bytes)``
    does the call (the grouped kernel keeps the keys in dynamic shared memory).
    ``renorm``: 0, 1 or 2 ("drop_zero", then ``drop`` holds the flags as int32 bit words,
    bit e % 32 of word e // 32, from ``drop_words``). ``norm_std``: sigma of the logits
    normalization (None: off), computed per token inside the kernel.

    ``max_blocks`` caps the grid (blocks then loop over the tokens); None: a block per
    _WARPS_PER_BLOCK tokens."""
    T, n = logits.shape
    blocks = (T + _WARPS_PER_BLOCK - 1) // _WARPS_PER_BLOCK
    if max_blocks is not None:
        blocks = min(blocks, max_blocks)
    if renorm == 2 and drop is None:
        raise ValueError("drop: required with renorm=2 (drop_zero)")
    # Absent bias / drop: the logits stand in (never read; a read-only array, so the
    # simulator's copy-back of every argument leaves the outputs alone).
    args = (logits, bias if bias is not None else logits, ids, weights, counts,
            drop if renorm == 2 else logits, np.int32(T),
            *_static_args(top_k, scoring_func, bias is not None, int(renorm), rsf, groups,
                          topk_group, norm_std))
    shared = _WARPS_PER_BLOCK * n * 4 if groups is not None else 0
    launch(kernel, (blocks,), (32 * _WARPS_PER_BLOCK,), args, shared)


def _aligned_contiguous(a):
    # The kernel reads 16 bytes at a time from the logits rows and the bias.
    if a.flags.c_contiguous and a.data.ptr % 16 == 0:
        return a
    out = cupy_module().empty(a.shape, a.dtype)
    out[...] = a
    return out


def drop_words(mask) -> np.ndarray:
    """int32 [ceil(n / 32)]: bit e % 32 of word e // 32 set where mask[e] (the kernel's layout)."""
    bits = np.zeros(-(-len(mask) // 32) * 32, np.uint8)
    bits[:len(mask)] = np.asarray(mask, bool)
    return np.packbits(bits, bitorder="little").view("<u4").astype(np.uint32).view(np.int32)


@memoize_per_device
def _drop_words_on_device(key: bytes):
    """The drop flags on the device, uploaded once per distinct mask and device."""
    return cupy_module().asarray(drop_words(np.frombuffer(key, dtype=np.bool_)))


def _route_gpu(logits, top_k, scoring_func, bias, renorm, rsf, groups, topk_group, drop,
               norm_std=None):
    cp = cupy_module()
    T, n = logits.shape
    if n > MAX_ROUTED_EXPERTS or top_k > MAX_TOP_K:
        raise ValueError(f"router_logits/top_k: the GPU router handles E+Z <= "
                         f"{MAX_ROUTED_EXPERTS} and top_k <= {MAX_TOP_K}, got E+Z={n}, "
                         f"top_k={top_k}")
    logits = _aligned_contiguous(logits)
    if bias is not None:
        bias = _aligned_contiguous(bias)
    # Three allocations: measured cheaper than one split into views (host time at T=1).
    ids = cp.empty((T, top_k), np.int32)
    weights = cp.empty((T, top_k), np.float32)
    counts = cp.empty((n,), np.int32)
    # A memset costs less host time than cupy.zeros' fill kernel (this path is per call).
    cp.cuda.runtime.memsetAsync(counts.data.ptr, 0, counts.nbytes,
                                cp.cuda.get_current_stream().ptr)
    if T:
        kernel, max_blocks = _route_function(groups is not None, n)
        drop_d = None if drop is None else _drop_words_on_device(drop.tobytes())
        launch_route_kernel(kernel, logits, bias, ids, weights, counts, top_k, scoring_func,
                            renorm, rsf, groups, topk_group,
                            lambda k, grid, block, args, shared: k(grid, block, args,
                                                                   shared_mem=shared),
                            max_blocks=max_blocks, drop=drop_d, norm_std=norm_std)
    return RoutingResult(ids, weights, counts)
