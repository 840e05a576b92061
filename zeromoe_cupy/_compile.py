"""Kernel loading and launching: CUDA C++ RawModules from package data, and Numba kernels as
CuPy functions.

Everything compiles lazily, once per device; CuPy's own disk cache keeps RawModules across runs.
Inside ``programmatic_launches()`` (CUDA-graph capture, graphs.py) the RawModules' kernels launch
with programmatic dependent launch (CUDA's cudaLaunchKernelEx attribute
"programmatic stream serialization", through cuda-bindings): each may start while the kernel
before it in the stream finishes, and waits for it in its first statement (kernels/common.cuh
``wait_for_prior_grid``). Outside it, and on GPUs before sm_90, they launch plainly.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.resources
import threading
from typing import Any, Callable, Sequence

import numpy as np

from ._arrays import cupy_module

NVRTC_OPTIONS = ("-std=c++17",)
_loaded_modules: list = []
_launch_mode = threading.local()  # .programmatic: set by programmatic_launches(), per thread


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


def raw_module(filename: str, name_expressions: Sequence[str], options: Sequence[str] = (),
               dynamic_smem: tuple[int, Sequence[str]] | None = None):
    """A cupy.RawModule for kernels/<filename> (extra NVRTC ``options``, e.g. -D macros),
    memoized per device by the caller. ``dynamic_smem``: (bytes, kernel names) of kernels
    launched with that much dynamic shared memory; beyond the default 48 KB they opt in."""
    cp = cupy_module()
    mod = KernelModule(cp.RawModule(code=kernel_source(filename),
                                    options=NVRTC_OPTIONS + tuple(options),
                                    name_expressions=list(name_expressions)))
    if dynamic_smem is not None and dynamic_smem[0] > 48 * 1024:
        for name in dynamic_smem[1]:
            mod.get_function(name).raw.max_dynamic_shared_size_bytes = dynamic_smem[0]
    return mod


class KernelModule:
    """A cupy.RawModule whose kernels launch as ``Kernel``s."""

    def __init__(self, module) -> None:
        self.module = module
        self._kernels: dict[str, Kernel] = {}

    def get_function(self, name: str) -> "Kernel":
        kernel = self._kernels.get(name)
        if kernel is None:
            kernel = self._kernels[name] = Kernel(self.module.get_function(name))
        return kernel


class Kernel:
    """A cupy.RawKernel, called like one: ``kernel(grid, block, args, shared_mem=0)``.

    Inside ``programmatic_launches()`` on sm_90 and later it launches with programmatic
    dependent launch (the kernel's source must begin with ``wait_for_prior_grid()``, as every
    kernel under kernels/ does; tests/test_compile.py checks it).
    """

    __slots__ = ("raw",)

    def __init__(self, raw) -> None:
        self.raw = raw

    def __call__(self, grid, block, args, *, shared_mem: int = 0) -> None:
        if getattr(_launch_mode, "programmatic", False):
            _launch_programmatic(self.raw, grid, block, args, shared_mem)
        else:
            self.raw(grid, block, args, shared_mem=shared_mem)

    def __getattr__(self, name: str):  # read-only attributes of the RawKernel (num_regs, ...)
        if name == "raw":  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.raw, name)


@contextlib.contextmanager
def programmatic_launches(enabled: bool = True):
    """Within the block, RawModule kernels launch with programmatic dependent launch if
    ``enabled`` and the GPU, driver and install support it (``_programmatic_supported``);
    else plainly. Yields whether they do. The setting is the calling thread's: another
    thread's launches meanwhile stay plain."""
    before = getattr(_launch_mode, "programmatic", False)
    _launch_mode.programmatic = enabled and _programmatic_supported()
    try:
        yield _launch_mode.programmatic
    finally:
        _launch_mode.programmatic = before


def _programmatic_supported() -> bool:
    """sm_90 or later (griddepcontrol), a driver of CUDA 12.3 or later (typed graph edges,
    cudaGraphEdgeData, which capture records the launches as) and cuda-bindings (installed
    by the cuda12 / cuda13 extras, through numba-cuda[cu12 / cu13]); False without a GPU."""
    cp = cupy_module()
    try:
        from cuda.bindings import driver  # noqa: F401
        major = cp.cuda.Device().compute_capability[:-1]
        return int(major) >= 9 and cp.cuda.runtime.driverGetVersion() >= 12030
    except (ImportError, AttributeError, cp.cuda.runtime.CUDARuntimeError):
        return False


def _dim3(name: str, dims) -> tuple[int, int, int]:
    """A grid or block as CuPy reads it: an int or a tuple of 1 to 3 ints, 0 taken as 1."""
    if isinstance(dims, (int, np.integer)):
        dims = (dims,)
    if not (isinstance(dims, (tuple, list)) and 1 <= len(dims) <= 3 and
            all(isinstance(d, (int, np.integer)) for d in dims)):
        raise TypeError(f"{name}: expected an int or a tuple of 1 to 3 ints, got {dims!r}")
    return tuple(max(1, int(d)) for d in dims) + (1,) * (3 - len(dims))  # type: ignore


def kernel_params(args: Sequence[Any]) -> tuple[Any, list]:
    """``args`` as a CUDA launch's ``void** kernelParams``: (ctypes array of pointers, the
    ctypes values it points at, to keep alive until the launch returns). Arguments convert as
    CuPy converts them (cupy._core._scalar): device arrays to their pointer, None to a null
    pointer, NumPy scalars and 0-d arrays to their own bytes, Python bool / int / float to
    bool / long long (unsigned long long from 2**63) / double. Raises TypeError for other
    kinds and OverflowError for ints beyond 64 bits, naming the argument."""
    cp = cupy_module()
    device_array = cp.ndarray if cp is not None else ()
    values: list = []
    for i, a in enumerate(args):
        if isinstance(a, device_array):
            values.append(ctypes.c_void_p(a.data.ptr))
        elif a is None:  # a null pointer
            values.append(ctypes.c_void_p(None))
        elif isinstance(a, np.generic) or (isinstance(a, np.ndarray) and a.ndim == 0):
            data = np.asarray(a).tobytes()  # float16, bfloat16, complex: bytes as CuPy passes
            values.append((ctypes.c_char * len(data)).from_buffer_copy(data))
        elif isinstance(a, bool):
            values.append(ctypes.c_bool(a))
        elif type(a) is int:
            if -2**63 <= a < 2**63:
                values.append(ctypes.c_longlong(a))
            elif 2**63 <= a < 2**64:
                values.append(ctypes.c_ulonglong(a))
            else:
                raise OverflowError(f"args[{i}]: {a} does not fit in 64 bits")
        elif type(a) is float:
            values.append(ctypes.c_double(a))
        else:
            raise TypeError(f"args[{i}]: expected a CuPy array, None or a scalar, got "
                            f"{type(a).__name__}")
    pointers = (ctypes.c_void_p * max(1, len(values)))(
        *[ctypes.addressof(v) for v in values])
    return pointers, values


def _launch_programmatic(raw, grid, block, args, shared_mem: int) -> None:
    from cuda.bindings import driver

    cp = cupy_module()
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = _dim3("grid", grid)
    config.blockDimX, config.blockDimY, config.blockDimZ = _dim3("block", block)
    config.sharedMemBytes = int(shared_mem)
    config.hStream = driver.CUstream(cp.cuda.get_current_stream().ptr)
    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    config.attrs = [attr]
    config.numAttrs = 1
    pointers, values = kernel_params(args)
    err, = driver.cuLaunchKernelEx(config, driver.CUfunction(raw.kernel.ptr),
                                   ctypes.addressof(pointers), 0)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuLaunchKernelEx: {err.name} (kernel {raw.name})")


def optin_shared_bytes() -> int:
    """The most dynamic shared memory a block of the current GPU may opt in to (bytes)."""
    rt = cupy_module().cuda.runtime
    return rt.deviceGetAttribute(rt.cudaDevAttrMaxSharedMemoryPerBlockOptin, rt.getDevice())


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
