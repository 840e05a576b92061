"""Zero-computation experts (identity, zero, constant) and the final combine (docs/spec.md,
steps 8-9).

NumPy arrays run a vectorized CPU path; CuPy arrays run one RawKernel pass per call
(kernels/combine.cu), which reads x and the expert rows once and writes y once.
"""
from __future__ import annotations

import functools
from typing import Sequence, Union

import numpy as np

from ._arrays import (DTYPES, as_array, check_bool, check_int, cupy_module, dtype_name, is_cupy,
                      is_float_dtype, vector_width, with_unit_row_layout)
from ._compile import memoize_per_device, raw_module
from .config import ZERO_EXPERT_TYPES

ZeroTypes = Union[str, Sequence[str]]
_TYPE_CODES = {name: code for code, name in enumerate(ZERO_EXPERT_TYPES)}  # matches combine.cu
_MAX_SLOTS = 64  # combine.cu keeps per-slot coefficients in shared memory
_COMBINE_WARPS = 8  # tokens per block in combine.cu
# Below this many tokens the combine splits H over more warps (slices of 32 * VEC features),
# up to about this many warps in all: enough loads in flight for a few tokens.
_COMBINE_MIN_WARPS = 4096


def zero_type_codes(zero_expert_type: ZeroTypes, num_zero_experts: int) -> np.ndarray:
    """int32 [Z] codes (identity 0, zero 1, constant 2) from one string or Z strings."""
    key = zero_expert_type if isinstance(zero_expert_type, str) else tuple(zero_expert_type)
    try:
        return _type_codes_cached(key, num_zero_experts)
    except TypeError:  # unhashable entries: report them through the uncached path
        return _type_codes(zero_expert_type, num_zero_experts)


@functools.lru_cache(maxsize=64)
def _type_codes_cached(zero_expert_type, num_zero_experts):
    codes = _type_codes(zero_expert_type, num_zero_experts)
    codes.flags.writeable = False  # shared between calls
    return codes


def _check_type_kind(zero_expert_type):
    if not isinstance(zero_expert_type, (str, list, tuple)):
        raise TypeError(f"zero_expert_type: expected one of {ZERO_EXPERT_TYPES} or a sequence "
                        f"of them, got {type(zero_expert_type).__name__} {zero_expert_type!r}")


def _type_codes(zero_expert_type, num_zero_experts):
    _check_type_kind(zero_expert_type)
    if isinstance(zero_expert_type, str):
        types = [zero_expert_type] * num_zero_experts
    else:
        types = list(zero_expert_type)
        if len(types) != num_zero_experts:
            raise ValueError(f"zero_expert_type: expected {num_zero_experts} entries, "
                             f"got {len(types)}")
    # a single name is checked even with no zero experts to apply it to
    named = [zero_expert_type] if isinstance(zero_expert_type, str) else types
    bad = [t for t in named if t not in _TYPE_CODES]
    if bad:
        raise ValueError(f"zero_expert_type: expected each of {ZERO_EXPERT_TYPES}, got {bad[0]!r}")
    return np.asarray([_TYPE_CODES[t] for t in types], dtype=np.int32)


def _check_routing_arrays(x, topk_ids, topk_weights):
    if x.ndim != 2:
        raise ValueError(f"x: expected a 2-D array [T, H], got shape {x.shape}")
    if dtype_name(x.dtype) is None:
        raise TypeError(f"x: expected bfloat16, float16 or float32, got {x.dtype}")
    T = x.shape[0]
    if topk_ids.ndim != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids: expected shape [T={T}, K], got {topk_ids.shape}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights: expected shape {topk_ids.shape}, got {topk_weights.shape}")
    if topk_ids.dtype.kind not in "iu":
        raise TypeError(f"topk_ids: expected an integer array, got {topk_ids.dtype}")
    if not is_float_dtype(topk_weights.dtype):
        raise TypeError(f"topk_weights: expected a float array, got {topk_weights.dtype}")
    for name, a in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if is_cupy(a) != is_cupy(x):
            raise TypeError(f"{name}: expected the same array kind as x "
                            f"({'CuPy' if is_cupy(x) else 'NumPy'}), got {type(a).__module__}")


def _check_constants(codes, H, const_vec, const_gate, like):
    Z = codes.shape[0]
    if not (codes == _TYPE_CODES["constant"]).any():
        return None, None
    if const_vec is None or const_gate is None:
        raise ValueError("const_vec, const_gate: required when a zero expert is 'constant'")
    if const_vec.shape != (Z, H):
        raise ValueError(f"const_vec: expected shape ({Z}, {H}), got {const_vec.shape}")
    if const_gate.shape != (Z, 2, H):
        raise ValueError(f"const_gate: expected shape ({Z}, 2, {H}), got {const_gate.shape}")
    for name, a in (("const_vec", const_vec), ("const_gate", const_gate)):
        if is_cupy(a) != is_cupy(like):
            raise TypeError(f"{name}: expected the same array kind as x")
    return const_vec, const_gate


def _expert_output_arrays(expert_output, x):
    """(rows, slot_rows) of an ExpertOutput (or a pair of arrays) on x's array kind."""
    if not isinstance(expert_output, tuple) or len(expert_output) != 2:
        raise TypeError(f"expert_output: expected the ExpertOutput(rows, slot_rows) of "
                        f"expert_mlp, got {type(expert_output).__name__}")
    rows = as_array(expert_output[0], "expert_output.rows")
    slot_rows = as_array(expert_output[1], "expert_output.slot_rows")
    for name, a in (("expert_output.rows", rows), ("expert_output.slot_rows", slot_rows)):
        if is_cupy(a) != is_cupy(x):
            raise TypeError(f"{name}: expected the same array kind as x "
                            f"({'CuPy' if is_cupy(x) else 'NumPy'}), got {type(a).__module__}")
    if slot_rows.dtype.kind not in "iu":
        raise TypeError(f"expert_output.slot_rows: expected an integer array, "
                        f"got {slot_rows.dtype}")
    return rows, slot_rows


def _check_ids_in_range(topk_ids, E, Z, expert_output=None):
    """Every id in [0, E+Z) and, with expert_output (rows, slot_rows), a row in [0, M)
    exactly for the slots whose id is a real expert (< E): rows that do not belong to this
    E would otherwise be dropped or misread without a word. One reduction (and, on the GPU,
    one host synchronization); skipped with check_ids=False."""
    if topk_ids.size == 0:
        return
    n = E + Z
    bad_ids = (topk_ids < 0) | (topk_ids >= n)
    bad = bad_ids
    if expert_output is not None:
        M, slot_rows = expert_output[0].shape[0], expert_output[1]
        bad = bad_ids | ((slot_rows >= 0) != (topk_ids < E)) | (slot_rows >= M)
    if not bool(bad.any()):
        return
    if bool(bad_ids.any()):
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        raise ValueError(f"topk_ids: expected ids in [0, {n}), got values in [{lo}, {hi}]")
    raise ValueError(f"num_experts / expert_output: expected expert_output.slot_rows to hold a "
                     f"row in [0, {M}) exactly where the id is a real expert (below "
                     f"num_experts={E}) and -1 elsewhere, got slots that disagree: pass the E "
                     f"of expert_mlp's w13 and its output for these same topk_ids")


def zero_expert_output(x, topk_ids, topk_weights, num_experts: int,
                       zero_expert_type: ZeroTypes = "identity", const_vec=None,
                       const_gate=None, *, num_zero_experts: int | None = None,
                       check_ids: bool = True):
    """The zero experts' share alone: sum over slots with id >= E of w * Zexp(x), [T, H].

    x: [T, H] bfloat16, float16 or float32; topk_ids: integer [T, K]; topk_weights: float
    [T, K]; const_vec [Z, H], const_gate [Z, 2, H] in x's dtype (for "constant" experts).
    Returns [T, H] in x's dtype, same array module as x. Arguments as in ``combine``.
    Ids below ``num_experts`` (real experts) contribute nothing here. Inputs are not modified.
    The number of zero experts Z is ``num_zero_experts`` if given, else the length of
    ``zero_expert_type`` when it is a sequence, else ``const_vec``'s rows, else the largest
    id + 1 - E. ``check_ids`` as in ``combine``.
    """
    return combine(x, topk_ids, topk_weights, num_experts, zero_expert_type,
                   expert_output=None, const_vec=const_vec, const_gate=const_gate,
                   num_zero_experts=num_zero_experts, check_ids=check_ids)


def combine(x, topk_ids, topk_weights, num_experts: int, zero_expert_type: ZeroTypes = "identity",
            expert_output=None, const_vec=None, const_gate=None, *, num_zero_experts=None,
            check_ids: bool = True):
    """y = sum_k w_k * (expert row of slot k if real, else Zexp(x)), fp32 sums, cast once.

    ``expert_output`` is what ``expert_mlp`` returned (rows, in x's dtype or float32, + the
    row of each real slot); None gives the zero experts' share alone. ``check_ids`` verifies
    on the host that every id lies in [0, E+Z) and, with ``expert_output``, that its
    slot_rows hold a row exactly where the id is below E (one reduction and, on the GPU, one
    synchronization); ids from ``route`` always do, and the layer skips the check. Unchecked
    out-of-range ids are never read out of bounds: they contribute nothing. With
    ``check_ids=False`` the caller vouches for ``expert_output.slot_rows`` (the GPU kernel
    reads the rows they name).

    Args:
        x: [T, H] bfloat16, float16 or float32.
        topk_ids: integer [T, K] (int32 on the GPU path; other integer dtypes are converted).
        topk_weights: float [T, K] (used in fp32).
        num_experts: E, an int >= 0; ids E..E+Z-1 are the zero experts.
        zero_expert_type: "identity", "zero" or "constant", or a sequence of Z of them.
        expert_output: None or the ``ExpertOutput(rows [M, H] in x's dtype or float32,
            slot_rows int32 [T, K])`` of ``expert_mlp`` for the same x and ids (its w13
            having E experts).
        const_vec, const_gate: [Z, H] and [Z, 2, H] in x's dtype, for "constant" experts.
        num_zero_experts: Z, an int >= 0 (see ``zero_expert_output`` for the default).

    Returns:
        y [T, H] in x's dtype, same array module as x. NaN or Inf in a row of x gives NaN or
        Inf in that row of y (on the CPU without a NumPy warning).

    Raises:
        ValueError: shapes, ids outside [0, E+Z), or (check_ids) num_experts and
            expert_output.slot_rows that disagree. TypeError: dtypes (expert_output.rows:
            x's or float32), array kinds, a check_ids that is not a bool.
    """
    x = as_array(x, "x")
    topk_ids = as_array(topk_ids, "topk_ids")
    topk_weights = as_array(topk_weights, "topk_weights")
    const_vec = as_array(const_vec, "const_vec", allow_none=True)
    const_gate = as_array(const_gate, "const_gate", allow_none=True)
    _check_routing_arrays(x, topk_ids, topk_weights)
    E = check_int("num_experts", num_experts, 0)
    check_ids = check_bool("check_ids", check_ids)
    _check_type_kind(zero_expert_type)
    if num_zero_experts is not None:
        num_zero_experts = check_int("num_zero_experts", num_zero_experts, 0)
    else:
        if not isinstance(zero_expert_type, str):
            num_zero_experts = len(zero_expert_type)
        elif const_vec is not None:
            num_zero_experts = const_vec.shape[0]
        else:
            num_zero_experts = max(0, int(topk_ids.max()) + 1 - E) if topk_ids.size else 0
    codes = zero_type_codes(zero_expert_type, num_zero_experts)
    H = x.shape[1]
    const_vec, const_gate = _check_constants(codes, H, const_vec, const_gate, x)
    for name, a in (("const_vec", const_vec), ("const_gate", const_gate)):
        if a is not None and a.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (x's), got {a.dtype}")
    if expert_output is not None:
        rows, slot_rows = _expert_output_arrays(expert_output, x)
        expert_output = (rows, slot_rows)
        if rows.dtype not in (x.dtype, np.float32):
            allowed = x.dtype if x.dtype == np.float32 else f"{x.dtype} (x's) or float32"
            raise TypeError(f"expert_output.rows: expected dtype {allowed}, got {rows.dtype}")
        if rows.ndim != 2 or rows.shape[1] != H:
            raise ValueError(f"expert_output.rows: expected shape [M, {H}], got {rows.shape}")
        if slot_rows.shape != topk_ids.shape:
            raise ValueError(f"expert_output.slot_rows: expected shape {topk_ids.shape}, "
                             f"got {slot_rows.shape}")
    if check_ids:
        _check_ids_in_range(topk_ids, E, num_zero_experts, expert_output)
    if is_cupy(x):
        return _combine_gpu(x, topk_ids, topk_weights, E, codes, expert_output,
                            const_vec, const_gate)
    with np.errstate(all="ignore"):  # NaN/Inf in x give NaN/Inf in y (documented), no warning
        return _combine_numpy(x, topk_ids, topk_weights, E, codes, expert_output,
                              const_vec, const_gate)


def _combine_numpy(x, ids, weights, E, codes, expert_output, const_vec, const_gate):
    T, H = x.shape
    x32 = x.astype(np.float32)
    w = weights.astype(np.float32)
    y = np.zeros((T, H), np.float32)
    rows32 = None
    if expert_output is not None:
        rows, slot_rows = expert_output
        rows32 = rows.astype(np.float32)
    for k in range(ids.shape[1]):  # a loop over slots, vectorized over tokens
        e = ids[:, k].astype(np.int64)
        wk = w[:, k:k + 1]
        if rows32 is not None:
            r = slot_rows[:, k]
            real = (e >= 0) & (e < E) & (r >= 0) & (r < rows32.shape[0])
            y[real] += wk[real] * rows32[r[real]]
        zero = (e >= E) & (e < E + codes.shape[0])  # ids outside [0, E+Z) contribute nothing
        kind = np.full(T, -1)
        kind[zero] = codes[e[zero] - E]
        ident = kind == _TYPE_CODES["identity"]
        y[ident] += wk[ident] * x32[ident]
        const = kind == _TYPE_CODES["constant"]
        if const.any():
            j = e[const] - E
            g = np.einsum("tch,th->tc", const_gate[j].astype(np.float32), x32[const])
            a = np.exp(g - g.max(axis=1, keepdims=True))
            a /= a.sum(axis=1, keepdims=True)
            y[const] += wk[const] * (a[:, :1] * x32[const] +
                                     a[:, 1:] * const_vec[j].astype(np.float32))
    return y.astype(x.dtype)


def combine_kernel_names() -> list[str]:
    """Every instantiation in kernels/combine.cu: rows in x's type or in fp32; the input
    scaling."""
    return ([f"combine_kernel<{ctype},{rtype},{vec}>"
             for _, (dt, ctype) in DTYPES.items() for rtype in dict.fromkeys((ctype, "float"))
             for vec in (1, 16 // dt.itemsize)]
            + [f"scale_rows_kernel<{ctype}>" for _, (dt, ctype) in DTYPES.items()])


@memoize_per_device
def _combine_module():
    return raw_module("combine.cu", combine_kernel_names())


def scaled_input(x, scale: float):
    """s * x rounded to x's dtype (the experts' input under ``expert_input_scale``): a new
    contiguous array; x itself when s == 1. NumPy or CuPy x [T, H]; s in fp32."""
    if scale == 1:
        return x
    s = np.float32(scale)
    if not is_cupy(x):
        return (x.astype(np.float32) * s).astype(x.dtype)
    cp = cupy_module()
    T, H = x.shape
    out = cp.empty((T, H), x.dtype)
    if T and H:
        x = with_unit_row_layout(x)
        n = T * H
        kernel = _combine_module().get_function(
            f"scale_rows_kernel<{DTYPES[dtype_name(x.dtype)][1]}>")
        kernel((min(-(-n // 256), 65536),), (256,),
               (x, np.int64(x.strides[0] // x.itemsize), out, np.int64(n), np.int32(H), s))
    return out


def _combine_gpu(x, ids, weights, E, codes, expert_output, const_vec, const_gate):
    cp = cupy_module()
    T, H = x.shape
    K = ids.shape[1]
    if K > _MAX_SLOTS:
        raise ValueError(f"topk_ids: the GPU combine handles K <= {_MAX_SLOTS}, got K={K}")
    out = cp.empty((T, H), x.dtype)
    if T == 0:
        return out
    x = with_unit_row_layout(x)
    ids = cp.ascontiguousarray(ids, dtype=np.int32)
    weights = cp.ascontiguousarray(weights, dtype=np.float32)
    rows = slot_rows = None
    if expert_output is not None:
        rows = cp.ascontiguousarray(expert_output[0])
        slot_rows = cp.ascontiguousarray(expert_output[1], dtype=np.int32)
    if const_vec is not None:
        const_vec = cp.ascontiguousarray(const_vec)
        const_gate = cp.ascontiguousarray(const_gate)
    codes_d = _codes_on_device(codes.tobytes())
    x_stride = x.strides[0] // x.itemsize
    vec = vector_width(x.itemsize, H, x, rows, const_vec, out, row_stride=x_stride)
    ctype = DTYPES[dtype_name(x.dtype)][1]
    rtype = ctype
    if rows is not None and rows.dtype != x.dtype:  # fp32 rows: vec of them in one access
        rtype = "float"
        if rows.data.ptr % (vec * 4):
            vec = 1
    kernel = _combine_module().get_function(f"combine_kernel<{ctype},{rtype},{vec}>")
    null = 0
    chunks = max(1, -(-H // (32 * vec)))
    per_slice = -(-chunks // min(chunks, max(1, _COMBINE_MIN_WARPS // T))) * 32 * vec
    kernel((-(-T // _COMBINE_WARPS), -(-H // per_slice)), (32 * _COMBINE_WARPS,),
           (x, np.int64(x_stride), ids, weights,
            rows if rows is not None else null, slot_rows if slot_rows is not None else null,
            codes_d, const_vec if const_vec is not None else null,
            const_gate if const_gate is not None else null,
            out, np.int64(T), np.int32(H), np.int32(K), np.int32(E), np.int32(codes.shape[0]),
            np.int32(per_slice)))
    return out


@memoize_per_device
def _codes_on_device(key: bytes):
    """The zero-type table on the device, uploaded once per distinct table and device."""
    cp = cupy_module()
    return cp.asarray(np.frombuffer(key, dtype=np.int32)) if key else cp.zeros(1, np.int32)
