"""cuBLAS called through ctypes on CuPy's libcublas: the entry points CuPy does not wrap, and
the GEMM and stream setting that CuPy refuses while a stream is being captured into a CUDA
graph (its cublas.setStream raises then; cuBLAS itself supports capture)."""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from ._arrays import cupy_module

CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_GEMM_DEFAULT = -1

CUDA_DTYPE = {"bfloat16": CUDA_R_16BF, "float16": CUDA_R_16F, "float32": CUDA_R_32F}


@functools.lru_cache(maxsize=None)
def library():
    """The libcublas that CuPy loaded (found by its soname once CuPy has loaded it)."""
    from cupy_backends.cuda.libs import cublas  # noqa: F401  (makes CuPy load libcublas)
    cp = cupy_module()
    version = cp.cuda.runtime.runtimeGetVersion() // 1000
    names = [f"libcublas.so.{version}", "libcublas.so.13", "libcublas.so.12", "libcublas.so"]
    try:
        with open("/proc/self/maps") as f:
            names = [line.split()[-1] for line in f if "libcublas.so" in line
                     and "libcublasLt" not in line][:1] + names
    except OSError:
        pass
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("could not open the libcublas that CuPy uses")


def has_grouped_gemm() -> bool:
    """cublasGemmGroupedBatchedEx exists from cuBLAS 12.5 on."""
    return hasattr(library(), "cublasGemmGroupedBatchedEx")


_P, _I = ctypes.c_void_p, ctypes.c_int
# Parameter types of the entry points called through ctypes (p: pointer or handle, i: int).
_SIGNATURES = {
    "cublasSetStream_v2": [_P, _P],
    "cublasGemmEx": [_P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _P, _I, _I, _P, _P, _I, _I, _I, _I],
    "cublasGemmGroupedBatchedEx": [_P, _P, _P, _P, _P, _P, _P, _P, _I, _P, _P, _I, _P, _P, _P,
                                   _I, _P, _I, _P, _I],
    "cublasGemmBatchedEx": [_P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _P, _I, _I, _P, _P, _I, _I,
                            _I, _I, _I],
}


@functools.lru_cache(maxsize=None)
def _function(name: str):
    fn = getattr(library(), name)
    fn.argtypes = _SIGNATURES[name]
    fn.restype = ctypes.c_int  # cublasStatus_t
    return fn


def _compute_type(dtype: str, allow_tf32: bool) -> int:
    return CUBLAS_COMPUTE_32F_FAST_TF32 if (dtype == "float32" and allow_tf32) \
        else CUBLAS_COMPUTE_32F


def _handle_on_current_stream() -> int:
    cp = cupy_module()
    handle = cp.cuda.device.get_cublas_handle()
    _check("cublasSetStream_v2", _function("cublasSetStream_v2")(
        handle, cp.cuda.get_current_stream().ptr))
    return handle


class CublasError(RuntimeError):
    """A cuBLAS call returned a status other than success (``status``)."""

    def __init__(self, name: str, status: int):
        super().__init__(f"{name} failed with status {status}")
        self.status = status


def _check(name: str, status: int) -> None:
    if status != 0:
        raise CublasError(name, status)


def _gemm_ex(handle, transa, transb, m, n, k, alpha, A, a_type, lda, B, b_type, ldb, beta,
             C, c_type, ldc, compute) -> None:
    """cublasGemmEx (column-major C = alpha op(A) op(B) + beta C); alpha, beta: host fp32
    arrays (host pointer mode)."""
    _check("cublasGemmEx", _function("cublasGemmEx")(
        handle, transa, transb, m, n, k, alpha.ctypes.data, A, a_type, lda, B, b_type, ldb,
        beta.ctypes.data, C, c_type, ldc, compute, CUBLAS_GEMM_DEFAULT))


def grouped_gemm_nt(weight_ptrs, x_ptrs, out_ptrs, rows, n: int, k: int, dtype: str,
                    allow_tf32: bool = False, out_dtype: str | None = None) -> None:
    """For each group g: out_g[rows_g, n] = x_g[rows_g, k] @ W_g[n, k]^T (row-major).

    ``*_ptrs`` are CuPy uint64 arrays of device pointers (one per group); ``rows`` is a host
    int array. In cuBLAS's column-major terms: C(n x rows) = op_T(W)(n x k) * X(k x rows).
    ``out_dtype``: the outputs' dtype name (default ``dtype``). Raises CublasError.
    """
    groups = len(rows)
    if groups == 0:
        return
    i32 = np.int32
    transa = np.full(groups, CUBLAS_OP_T, i32)
    transb = np.full(groups, CUBLAS_OP_N, i32)
    m_arr = np.full(groups, n, i32)
    n_arr = np.asarray(rows, i32)
    k_arr = np.full(groups, k, i32)
    alpha = np.ones(groups, np.float32)
    beta = np.zeros(groups, np.float32)
    ones = np.ones(groups, i32)
    dt = CUDA_DTYPE[dtype]
    compute = _compute_type(dtype, allow_tf32)
    status = _function("cublasGemmGroupedBatchedEx")(
        _handle_on_current_stream(), transa.ctypes.data, transb.ctypes.data,
        m_arr.ctypes.data, n_arr.ctypes.data, k_arr.ctypes.data, alpha.ctypes.data,
        weight_ptrs.data.ptr, dt, k_arr.ctypes.data,
        x_ptrs.data.ptr, dt, k_arr.ctypes.data,
        beta.ctypes.data, out_ptrs.data.ptr, CUDA_DTYPE[out_dtype or dtype], m_arr.ctypes.data,
        groups, ones.ctypes.data, compute)
    _check("cublasGemmGroupedBatchedEx", status)


def batched_gemm_nt(weight_ptrs, x_ptrs, out_ptrs, rows: int, n: int, k: int, dtype: str,
                    allow_tf32: bool = False, out_dtype: str | None = None) -> None:
    """For each batch entry b: out_b[rows, n] = x_b[rows, k] @ W_b[n, k]^T (row-major), one
    cublasGemmBatchedEx call: every entry has the same shape; pointers and ``out_dtype`` as in
    grouped_gemm_nt. Raises CublasError."""
    count = int(weight_ptrs.size)
    if count == 0:
        return
    dt = CUDA_DTYPE[dtype]
    alpha = np.ones(1, np.float32)
    beta = np.zeros(1, np.float32)
    status = _function("cublasGemmBatchedEx")(
        _handle_on_current_stream(), CUBLAS_OP_T, CUBLAS_OP_N, n, rows, k, alpha.ctypes.data,
        weight_ptrs.data.ptr, dt, k, x_ptrs.data.ptr, dt, k, beta.ctypes.data,
        out_ptrs.data.ptr, CUDA_DTYPE[out_dtype or dtype], n, count,
        _compute_type(dtype, allow_tf32), CUBLAS_GEMM_DEFAULT)
    _check("cublasGemmBatchedEx", status)


def gemm_nt_bf16_f32_accumulate(terms, out) -> None:
    """out[m, n] = sum over (weight, x, chunk) in terms of x[m, k] @ weight[n, k]^T, bf16
    inputs (weight [N, K], x [M, K], unit column stride), fp32 out and compute, in the order
    given: the first GEMM overwrites out, the next ones add to it (beta = 1, an fp32 add in
    cuBLAS's epilogue). ``chunk``: None for one GEMM over all of K, else one GEMM per chunk of
    that many k's, in order. The chunks are addressed by pointer (no array views: each view
    costs host time, and the eager router runs this on every call). One handle and stream set
    for all."""
    handle = _handle_on_current_stream()
    m, n = out.shape
    first = True
    for weight, x, chunk in terms:
        K = x.shape[1]
        step = chunk or K
        w_ptr, x_ptr = weight.data.ptr, x.data.ptr
        ldw, ldx = weight.strides[0] // 2, x.strides[0] // 2  # bf16: 2 bytes
        for k0 in range(0, K, step):
            _gemm_ex(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, min(step, K - k0), _ONE,
                     w_ptr + 2 * k0, CUDA_R_16BF, ldw, x_ptr + 2 * k0, CUDA_R_16BF, ldx,
                     _ZERO if first else _ONE, out.data.ptr, CUDA_R_32F, n, CUBLAS_COMPUTE_32F)
            first = False


# alpha / beta of the GEMMs above (host pointer mode: cuBLAS reads them during the call)
_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)


def gemm_nt(weight, x, out, allow_tf32: bool = False, beta: float = 0.0) -> None:
    """out[m, n] = x[m, k] @ weight[n, k]^T + beta * out for one matrix (cublasGemmEx). Each
    operand has its own dtype (e.g. bf16 inputs, fp32 out); weight and x may be
    row-strided views (unit column stride); out is C-contiguous."""
    from ._arrays import dtype_name
    m, k = x.shape
    n = weight.shape[0]
    if m == 0:
        return
    name = dtype_name(x.dtype)
    compute = _compute_type(name, allow_tf32)
    alpha = np.ones(1, np.float32)
    beta_arr = np.full(1, beta, np.float32)
    _gemm_ex(_handle_on_current_stream(), CUBLAS_OP_T, CUBLAS_OP_N, n, m, k,
             alpha, weight.data.ptr, CUDA_DTYPE[dtype_name(weight.dtype)],
             weight.strides[0] // weight.itemsize,
             x.data.ptr, CUDA_DTYPE[name], x.strides[0] // x.itemsize,
             beta_arr, out.data.ptr, CUDA_DTYPE[dtype_name(out.dtype)], n, compute)


# --- cuBLASLt: block-scaled FP8 GEMMs ------------------------------------------------------------
# Enum values from cuBLAS 13's cublasLt.h / library_types.h.
CUDA_R_8F_E4M3 = 28
LT_DESC_TRANSA, LT_DESC_TRANSB = 3, 4
LT_DESC_A_SCALE_POINTER, LT_DESC_B_SCALE_POINTER = 17, 18
LT_DESC_A_SCALE_MODE, LT_DESC_B_SCALE_MODE = 31, 32
LT_SCALE_VEC128_32F, LT_SCALE_BLK128x128_32F = 4, 5
LT_PREF_MAX_WORKSPACE_BYTES = 1
LT_WORKSPACE_BYTES = 32 << 20
_HEURISTIC_RESULT_BYTES = 96  # cublasLtMatmulHeuristicResult_t: algo[64], size_t, int, float, int[4]


class CublasLtError(RuntimeError):
    """A cuBLASLt call refused the block-scaled FP8 GEMM (``status``: the cublasStatus_t)."""

    def __init__(self, what: str, status: int):
        super().__init__(f"{what} failed with cublasStatus {status}")
        self.status = status


@functools.lru_cache(maxsize=None)
def lt_library():
    """The libcublasLt next to the libcublas that CuPy loaded."""
    library()
    names = []
    try:
        with open("/proc/self/maps") as f:
            names = [line.split()[-1] for line in f if "libcublasLt.so" in line][:1]
    except OSError:
        pass
    version = cupy_module().cuda.runtime.runtimeGetVersion() // 1000
    names += [f"libcublasLt.so.{version}", "libcublasLt.so.13", "libcublasLt.so.12",
              "libcublasLt.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("could not open libcublasLt")


_S = ctypes.c_size_t
_LT_SIGNATURES = {
    "cublasLtCreate": [_P],
    "cublasLtMatmulDescCreate": [_P, _I, _I],
    "cublasLtMatmulDescSetAttribute": [_P, _I, _P, _S],
    "cublasLtMatrixLayoutCreate": [_P, _I, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
    "cublasLtMatmulPreferenceCreate": [_P],
    "cublasLtMatmulPreferenceSetAttribute": [_P, _I, _P, _S],
    "cublasLtMatmulAlgoGetHeuristic": [_P, _P, _P, _P, _P, _P, _P, _I, _P, _P],
    "cublasLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _S, _P],
}


@functools.lru_cache(maxsize=None)
def _lt_function(name: str):
    fn = getattr(lt_library(), name)
    fn.argtypes = _LT_SIGNATURES[name]
    fn.restype = ctypes.c_int  # cublasStatus_t
    return fn


def _lt(name: str, *args) -> None:
    status = _lt_function(name)(*args)
    if status != 0:
        raise CublasLtError(name, status)


def _lt_create(name: str, *args) -> int:
    handle = ctypes.c_void_p()
    _lt(name, ctypes.byref(handle), *args)
    return handle.value


def _set(name: str, obj: int, attr: int, value) -> None:
    _lt(name, obj, attr, ctypes.byref(value), ctypes.sizeof(value))


class _LtPlan:
    """Descriptors and the heuristic's algorithm for one GEMM shape (kept for the process)."""

    def __init__(self, handle, m: int, n: int, k: int, out_type: int, workspace: int):
        self.desc = _lt_create("cublasLtMatmulDescCreate", CUBLAS_COMPUTE_32F, CUDA_R_32F)
        for attr, v in ((LT_DESC_TRANSA, CUBLAS_OP_T), (LT_DESC_TRANSB, CUBLAS_OP_N),
                        (LT_DESC_A_SCALE_MODE, LT_SCALE_BLK128x128_32F),
                        (LT_DESC_B_SCALE_MODE, LT_SCALE_VEC128_32F)):
            _set("cublasLtMatmulDescSetAttribute", self.desc, attr, ctypes.c_int32(v))
        # The heuristic wants scale pointers set; it does not read them (an aligned dummy).
        for attr in (LT_DESC_A_SCALE_POINTER, LT_DESC_B_SCALE_POINTER):
            _set("cublasLtMatmulDescSetAttribute", self.desc, attr, ctypes.c_void_p(workspace))
        # Column-major: A = W as k x n (ld k, transposed), B = X as k x m, D = Y as n x m.
        self.a = _lt_create("cublasLtMatrixLayoutCreate", CUDA_R_8F_E4M3, k, n, k)
        self.b = _lt_create("cublasLtMatrixLayoutCreate", CUDA_R_8F_E4M3, k, m, k)
        self.d = _lt_create("cublasLtMatrixLayoutCreate", out_type, n, m, n)
        pref = _lt_create("cublasLtMatmulPreferenceCreate")
        _set("cublasLtMatmulPreferenceSetAttribute", pref, LT_PREF_MAX_WORKSPACE_BYTES,
             ctypes.c_uint64(LT_WORKSPACE_BYTES))
        result = (ctypes.c_ubyte * _HEURISTIC_RESULT_BYTES)()
        count = ctypes.c_int(0)
        _lt("cublasLtMatmulAlgoGetHeuristic", handle, self.desc, self.a, self.b, self.d, self.d,
            pref, 1, result, ctypes.byref(count))
        if count.value == 0:
            raise CublasLtError(f"cublasLtMatmulAlgoGetHeuristic (m={m}, n={n}, k={k}: no "
                                f"algorithm)", 15)
        self.algo = result  # the algo is the first 64 bytes of the result


@functools.lru_cache(maxsize=None)
def _lt_state(device: int):
    cp = cupy_module()
    handle = _lt_create("cublasLtCreate")
    workspace = cp.empty(LT_WORKSPACE_BYTES, np.uint8)
    return handle, workspace, {}


def fp8_gemm_nt(weight, weight_scale, x, x_scale, out, m: int) -> None:
    """out[m, n] = dequant(x)[m, k] @ dequant(weight)[n, k]^T with cuBLASLt's block-scaled FP8.

    weight: e4m3 bytes [n, k] (CuPy uint8 view, C-contiguous), weight_scale fp32, one per
    128x128 block, in the layout experts.fp8._lt_self_check found on this GPU (documented:
    [n/128, k/128] with rows padded to a multiple of 4); x: e4m3 bytes, m rows of k at x's pointer;
    x_scale: fp32 [k/128, m] (M-major: one per row and 128 features); out: m rows of n in
    bf16/fp16/fp32 at out's pointer. n, k multiples of 128, m a multiple of 4, pointers 16-byte
    aligned. Raises CublasLtError with the status where cuBLASLt refuses.
    """
    from ._arrays import dtype_name
    cp = cupy_module()
    n, k = weight.shape
    handle, workspace, plans = _lt_state(cp.cuda.runtime.getDevice())
    out_type = CUDA_DTYPE[dtype_name(out.dtype)]
    key = (m, n, k, out_type)
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = _LtPlan(handle, m, n, k, out_type, workspace.data.ptr)
    _set("cublasLtMatmulDescSetAttribute", plan.desc, LT_DESC_A_SCALE_POINTER,
         ctypes.c_void_p(weight_scale.data.ptr))
    _set("cublasLtMatmulDescSetAttribute", plan.desc, LT_DESC_B_SCALE_POINTER,
         ctypes.c_void_p(x_scale.data.ptr))
    alpha = ctypes.c_float(1.0)
    beta = ctypes.c_float(0.0)
    _lt("cublasLtMatmul", handle, plan.desc, ctypes.byref(alpha), weight.data.ptr, plan.a,
        x.data.ptr, plan.b, ctypes.byref(beta), out.data.ptr, plan.d, out.data.ptr, plan.d,
        plan.algo, workspace.data.ptr, LT_WORKSPACE_BYTES, cp.cuda.get_current_stream().ptr)
