"""Kernel loading: CUDA C++ RawModules from package data, and Numba kernels as CuPy functions.

Everything compiles lazily, once per device; CuPy's own disk cache keeps RawModules across runs.
"""
from __future__ import annotations

import functools
import importlib.resources
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


def raw_module(filename: str, name_expressions: Sequence[str], options: Sequence[str] = (),
               dynamic_smem: tuple[int, Sequence[str]] | None = None):
    """A cupy.RawModule for kernels/<filename> (extra NVRTC ``options``, e.g. -D macros),
    memoized per device by the caller. ``dynamic_smem``: (bytes, kernel names) of kernels
    launched with that much dynamic shared memory; beyond the default 48 KB they opt in."""
    cp = cupy_module()
    mod = cp.RawModule(code=kernel_source(filename), options=NVRTC_OPTIONS + tuple(options),
                       name_expressions=list(name_expressions))
    if dynamic_smem is not None and dynamic_smem[0] > 48 * 1024:
        for name in dynamic_smem[1]:
            mod.get_function(name).max_dynamic_shared_size_bytes = dynamic_smem[0]
    return mod


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
