"""Kernel loading: CUDA C++ RawModules from package data, and Numba kernels as CuPy functions.

Everything compiles lazily, once per device; CuPy's own disk cache keeps RawModules across runs.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.resources
import threading
from typing import Callable, Sequence

from ._arrays import cupy_module

NVRTC_OPTIONS = ("-std=c++17",)
_loaded_modules: list = []


def kernel_source(filename: str) -> str:
    """The text of kernels/<filename>, with local #includes of kernels/*.cuh inlined."""
    src = importlib.resources.files("zeromoe_cupy").joinpath("kernels", filename).read_text()
    out = []
    for line in src.splitlines():
        stripped = line.strip()
        if stripped.startswith('#include "') and stripped.endswith('.cuh"'):
            out.append(kernel_source(stripped[len('#include "'):-1]))
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def raw_module(filename: str, name_expressions: Sequence[str]):
    """A cupy.RawModule for kernels/<filename>, memoized per device by the caller."""
    cp = cupy_module()
    return cp.RawModule(code=kernel_source(filename), options=NVRTC_OPTIONS,
                        name_expressions=list(name_expressions))


def numba_kernel_as_cupy(pyfunc: Callable, signature, launch_bounds=None) -> "object":
    """Compile a Numba CUDA kernel for the current device and load it as a CuPy function.

    Launching through CuPy's RawKernel path costs a few microseconds of host time, where
    Numba's dispatcher costs tens to a hundred. The kernel takes only pointers and scalars.
    """
    from numba import cuda

    dispatcher = cuda.jit(signature, launch_bounds=launch_bounds)(pyfunc)
    kernel = next(iter(dispatcher.overloads.values()))
    cubin = kernel._codelibrary.get_cubin()  # linked for this device's compute capability
    cubin = getattr(cubin, "code", cubin)  # numba-cuda >= 0.30 wraps it in an ObjectCode
    cp = cupy_module()
    module = cp.cuda.function.Module()
    module.load(bytes(cubin))
    _loaded_modules.append(module)  # keep the module loaded for the process's lifetime
    return module.get_function(kernel.entry_name)


def numba_param_ctypes(signature) -> list:
    """The ctypes type of each kernel parameter a Numba signature compiles to: pointers,
    32-bit scalars, and a 1-D array as its 7 expanded fields (see routing.numba_array_args)."""
    from numba import types
    out = []
    for t in signature:
        if isinstance(t, types.CPointer):
            out.append(ctypes.c_void_p)
        elif isinstance(t, types.Array):
            out += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        elif t == types.float32:
            out.append(ctypes.c_float)
        elif t == types.int32:
            out.append(ctypes.c_int32)
        else:
            raise TypeError(f"no ctypes mapping for kernel parameter type {t}")
    return out


@functools.lru_cache(maxsize=None)
def _cu_launch_kernel():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    fn = lib.cuLaunchKernel
    u, p = ctypes.c_uint, ctypes.c_void_p
    fn.argtypes = [p, u, u, u, u, u, u, u, p, p, p]
    fn.restype = ctypes.c_int
    return fn


class DriverLauncher:
    """Launches one loaded kernel with cuLaunchKernel through ctypes.

    CuPy's generic launch converts every argument on every call (about 15 us of host time
    for a kernel with twenty parameters); here the argument buffers are made once per thread
    and only their values change. Arguments: CuPy arrays (their pointer) or numbers. Falls
    back to CuPy's launch when the driver call is unavailable or refused.
    """

    def __init__(self, function, param_ctypes: Sequence):
        self.function = function
        self.param_ctypes = list(param_ctypes)
        self._pointer = [t is ctypes.c_void_p for t in self.param_ctypes]
        self._local = threading.local()

    def _buffers(self):
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            values = [t() for t in self.param_ctypes]
            params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
            bufs = self._local.bufs = (values, params)
        return bufs

    def __call__(self, grid, block, args, shared_mem: int = 0):
        cp = cupy_module()
        launch = _cu_launch_kernel()
        if launch is not None:
            values, params = self._buffers()
            for v, a, pointer in zip(values, args, self._pointer):
                if type(a) is cp.ndarray:
                    v.value = a.data.ptr
                else:  # a c_void_p takes only a Python int
                    v.value = int(a) if pointer else a
            grid = tuple(grid) + (1,) * (3 - len(grid))
            block = tuple(block) + (1,) * (3 - len(block))
            status = launch(self.function.ptr, *grid, *block, shared_mem,
                            cp.cuda.get_current_stream().ptr, params, None)
            if status == 0:
                return
        # no driver entry point, or no current context
        self.function(grid, block, args, shared_mem=shared_mem)


def memoize_per_device(fn):
    """cupy.memoize(for_each_device=True), applied lazily so importing needs no CuPy."""
    cache: dict = {}

    @functools.wraps(fn)
    def wrapper(*args):
        cp = cupy_module()
        key = (cp.cuda.runtime.getDevice(),) + args
        if key not in cache:
            cache[key] = fn(*args)
        return cache[key]

    wrapper.cache_clear = cache.clear  # type: ignore[attr-defined]
    return wrapper
