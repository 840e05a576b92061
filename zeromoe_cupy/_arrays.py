"""Array-module dispatch, DLPack import at the edges, and the dtype table."""
from __future__ import annotations

import functools
import numbers
from typing import Any

import ml_dtypes
import numpy as np

# dtype name -> (NumPy dtype, CUDA C++ type used in the kernels' name_expressions)
DTYPES: dict[str, tuple[np.dtype, str]] = {
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), "__nv_bfloat16"),
    "float16": (np.dtype(np.float16), "__half"),
    "float32": (np.dtype(np.float32), "float"),
}


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a Python bool (bools and NumPy bool scalars); TypeError naming ``name`` for
    anything else: 0, None or "no" must not pass for False."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as a Python int (ints and NumPy integer scalars), at least ``minimum``.

    Raises TypeError naming ``name`` for a bool or a non-integer (2.0, "2", None): a wrong
    kind; ValueError for an int below ``minimum``: a wrong value.
    """
    expected = "an int" if minimum is None else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return int(value)


def np_dtype(name: str) -> np.dtype:
    return DTYPES[name][0]


def dtype_name(dtype: Any) -> str | None:
    """The config name of a NumPy/CuPy dtype, or None if it is not a layer dtype."""
    dt = np.dtype(dtype)
    for name, (d, _) in DTYPES.items():
        if d == dt:
            return name
    return None


@functools.lru_cache(maxsize=None)
def cupy_module():
    """CuPy if it imports, else None. Importing CuPy needs no GPU."""
    try:
        import cupy
    except Exception:  # pragma: no cover - depends on the install
        return None
    return cupy


@functools.lru_cache(maxsize=None)
def _gpu_probe() -> tuple[bool, str | None]:
    cp = cupy_module()
    if cp is None:
        return False, "CuPy is not installed (pip install 'zeromoe-cupy[cuda13]')"
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device node, a driver too old for the runtime
        return False, f"{type(exc).__name__}: {exc}"
    if count == 0:
        return False, "the CUDA driver reports no device"
    return True, None


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device (checked once per process)."""
    return _gpu_probe()[0]


def gpu_unavailable_reason() -> str | None:
    """Why ``gpu_available()`` is False (CuPy's own error text where there is one), else None."""
    return _gpu_probe()[1]


def resolve_device(device: str, name: str = "device") -> str:
    """"cuda" or "cpu" from "cuda", "cpu" or "auto" ("cuda" when a GPU is usable).
    Raises ValueError for other values, RuntimeError for "cuda" without a usable GPU."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"{name}: expected 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "auto":
        return "cuda" if gpu_available() else "cpu"
    if device == "cuda" and not gpu_available():
        raise RuntimeError(f"{name}='cuda': no usable CUDA GPU ({gpu_unavailable_reason()}); "
                           f"use {name}='cpu' (or 'auto') for the NumPy path")
    return device


def is_float_dtype(dtype: Any) -> bool:
    """A floating-point dtype: NumPy's float kinds, and bfloat16 (ml_dtypes)."""
    dt = np.dtype(dtype)
    return dt.kind == "f" or dtype_name(dt) is not None


def is_cupy(a: Any) -> bool:
    cp = cupy_module()
    return cp is not None and isinstance(a, cp.ndarray)


_KDLCPU, _KDLCUDA, _KDLCUDAHOST, _KDLCUDAMANAGED = 1, 2, 3, 13


def as_array(a: Any, name: str, allow_none: bool = False):
    """Return ``a`` as a NumPy or CuPy array without copying.

    NumPy and CuPy arrays pass through; any other object with ``__dlpack__`` (torch, JAX)
    is imported zero-copy: CUDA memory as CuPy, host memory as NumPy. NumPy subclasses
    (np.memmap, ...) become plain ndarray views of the same memory, except np.matrix and
    masked arrays, refused with a TypeError: their operators and reductions differ from
    ndarray's, and a mask would be silently ignored. The one copy: a NumPy array of the
    other byte order (">f4" on this machine) becomes a native one of the same values, which
    every dtype check and kernel here expects.
    """
    if a is None:
        if allow_none:
            return None
        raise TypeError(f"{name}: expected an array, got None")
    if isinstance(a, np.ndarray):
        if isinstance(a, np.matrix):
            raise TypeError(f"{name}: expected a plain ndarray, got numpy.matrix; pass "
                            f"np.asarray({name})")
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"{name}: expected a plain ndarray, got a masked array (the layer "
                            f"has no notion of a mask); pass {name}.filled(value)")
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        return a if type(a) is np.ndarray else a.view(np.ndarray)
    if is_cupy(a):
        return a
    if getattr(a, "requires_grad", False):
        raise ValueError(f"{name}: the tensor requires grad; this layer computes no gradients, "
                         f"pass {name}.detach()")
    if hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__"):
        dev_type = int(a.__dlpack_device__()[0])
        if dev_type in (_KDLCUDA, _KDLCUDAMANAGED):
            cp = cupy_module()
            if cp is None:
                raise TypeError(f"{name}: a CUDA tensor was given but CuPy is not installed "
                                "(pip install 'zeromoe-cupy[cuda13]')")
            return cp.from_dlpack(a)
        if dev_type in (_KDLCPU, _KDLCUDAHOST):
            try:
                return np.from_dlpack(a)
            except (TypeError, ValueError, BufferError, RuntimeError) as exc:
                # NumPy has no bfloat16 in DLPack: go through the tensor's own NumPy view.
                if hasattr(a, "view") and hasattr(a, "numpy") and "bfloat16" in str(a.dtype):
                    import ml_dtypes as _md
                    return a.view(_int16_dtype_of(a)).numpy().view(_md.bfloat16)
                raise TypeError(f"{name}: could not import the host tensor through DLPack "
                                f"({exc})") from exc
        raise TypeError(f"{name}: arrays on DLPack device type {dev_type} are not supported; "
                        "expected host (NumPy) or CUDA memory")
    if isinstance(a, (list, tuple)) or np.isscalar(a):
        raise TypeError(f"{name}: expected a NumPy/CuPy array or a DLPack tensor, got "
                        f"{type(a).__name__}; wrap it with numpy.asarray first")
    raise TypeError(f"{name}: expected a NumPy/CuPy array or an object with __dlpack__, got "
                    f"{type(a).__name__}")


def _int16_dtype_of(t):  # torch.int16 without importing torch at module import
    import torch
    return torch.int16


def with_unit_row_layout(x):
    """The 2-D CuPy array x itself when each row is a unit-stride run and rows follow at a
    positive whole-element stride (what the kernels and cuBLAS read), else a C-contiguous copy."""
    if (x.strides[1] == x.itemsize and x.strides[0] % x.itemsize == 0
            and x.strides[0] >= x.shape[1] * x.itemsize):
        return x
    return cupy_module().ascontiguousarray(x)


def vector_width(itemsize: int, H: int, *arrays, row_stride: int | None = None) -> int:
    """Elements per 16-byte access when H, the row stride (in elements) and every pointer
    allow it, else 1."""
    vec = 16 // itemsize
    if H % vec or (row_stride is not None and row_stride % vec):
        return 1
    for a in arrays:
        if a is not None and a.data.ptr % 16:
            return 1
    return vec


def fixed_order_matmul(a, b):
    """a @ b (NumPy, float32 out) with each output summed over k = 0, 1, 2, ... in that order,
    whatever the shapes: BLAS picks kernels and blockings by shape, so a row's bits would
    depend on the other rows. Elementwise float64 steps instead (the fp32 products are exact
    in float64); slow, for the deterministic mode on the CPU. NaN/Inf inputs give NaN/Inf
    outputs without a NumPy warning."""
    out = np.zeros((a.shape[0], b.shape[1]), np.float64)
    with np.errstate(all="ignore"):
        for k in range(a.shape[1]):
            out += np.multiply.outer(a[:, k].astype(np.float64), b[k].astype(np.float64))
        return out.astype(np.float32)
