"""Every kernel compiles without a GPU: the CUDA C++ RawKernels through NVRTC (each dtype
instantiation, sm_80 and sm_90), the Numba routing kernel through compile_ptx."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import zeromoe_cupy

from zeromoe_cupy._compile import NVRTC_OPTIONS, kernel_source
from zeromoe_cupy.experts import experts_kernel_names
from zeromoe_cupy.parallel.exchange import EXCHANGE_KERNELS
from zeromoe_cupy.experts.syncfree import PIPELINE, SMALL_PIPELINE, syncfree_kernel_names
from zeromoe_cupy.quant import (FP8_PIPELINE, SMALL_FP8_PIPELINE, WGMMA_PIPELINE,
                                fp8_kernel_names, fp8_wgmma_kernel_names,
                                wgmma_rows_n_sizes)
from zeromoe_cupy.routing import (_ROUTER_GEMV_ROWS, _ROUTER_GEMV_SPLIT,
                                  router_kernel_names)
from zeromoe_cupy.zero_experts import combine_kernel_names

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="needs cuda-bindings (cuda13 extra)")

KERNELS = {
    "combine.cu": combine_kernel_names(),
    "copy.cu": ["copy_16byte"],
    "exchange.cu": EXCHANGE_KERNELS,
    "experts.cu": experts_kernel_names(),
    "fp8.cu": fp8_kernel_names(),
    "fp8_wgmma.cu": fp8_wgmma_kernel_names(),
    "router.cu": router_kernel_names(),
    "syncfree.cu": syncfree_kernel_names(),
}


def _include_dirs():
    import nvidia
    dirs = []
    for root in nvidia.__path__:
        for sub in ("cu13/include", "cu12/include", "cuda_runtime/include", "cuda_nvrtc/include"):
            d = os.path.join(root, sub)
            if os.path.isdir(d):
                dirs.append(d)
    for d in ("/usr/local/cuda/include",):
        if os.path.isdir(d):
            dirs.append(d)
    return dirs


def _check(result):
    err = result[0]
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    return result[1:] if len(result) > 2 else (result[1] if len(result) > 1 else None)


# syncfree.cu's pipelines: the two the package runs, and each prefetch size of the sweep.
SYNCFREE_VARIANTS = [dict(PIPELINE), dict(SMALL_PIPELINE)] + \
    [dict(SMALL_PIPELINE, SF_PREFETCH=p) for p in (0, 64, 128)]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("filename", sorted(KERNELS))
def test_cuda_kernels_compile_with_nvrtc(filename, arch):
    _compile(filename, arch, ())


@pytest.mark.parametrize("variant", SYNCFREE_VARIANTS, ids=str)
def test_syncfree_pipeline_variants_compile(variant):
    _compile("syncfree.cu", "sm_90", tuple(f"-D{k}={v}" for k, v in variant.items()))


@pytest.mark.parametrize("split,rows,unroll", [(4, 2, 4), (8, 1, 2), (16, 1, 2), (2, 4, 8)])
def test_router_variants_compile(split, rows, unroll):
    """router_gemv with other warps per row, rows per block and loads ahead (what
    benchmarks/router_variants.py times)."""
    _compile("router.cu", "sm_90", (f"-DRG_SPLIT={split}", f"-DRG_ROWS={rows}",
                                    f"-DRG_UNROLL={unroll}"))


@pytest.mark.parametrize("options", [("-DG8_PREFETCH=0",), ("-DG8_PREFETCH=256",),
                                     tuple(f"-D{k}={v}" for k, v in FP8_PIPELINE),
                                     tuple(f"-D{k}={v}" for k, v in SMALL_FP8_PIPELINE)])
def test_fp8_variants_compile(options):
    _compile("fp8.cu", "sm_90", options)


# fp8_wgmma.cu's pipelines: the package's (WGMMA_PIPELINE, the kernel's defaults) and the
# variants the GPU tests and benchmarks/fp8_prefill.py run (two warpgroups, six stages, feature
# chunks inner, 64- and 128-k partial sums, every thread copying, with one or two warpgroups,
# the L2 prefetch hint off and at 256 bytes).
WGMMA_VARIANTS = [()] + \
    [tuple(dict(WGMMA_PIPELINE, **change).items())
     for change in (dict(WG_GROUPS=2), dict(WG_STAGES=6), dict(WG_ORDER=1),
                    dict(WG_PROMOTE=64), dict(WG_PROMOTE=128), dict(WG_PRODUCER=0),
                    dict(WG_PRODUCER=0, WG_GROUPS=2), dict(WG_GROUPS=2, WG_STAGES=6),
                    dict(WG_PREFETCH=0), dict(WG_PREFETCH=256))]


@pytest.mark.parametrize("pipeline", WGMMA_VARIANTS, ids=str)
def test_wgmma_kernels_compile_for_sm_90a(pipeline):
    """fp8_wgmma.cu's kernels hold their wgmma code only where NVRTC targets sm_90a (what the
    package asks for); ptxas then checks every wgmma, fence and descriptor. Elsewhere (sm_80,
    sm_90 above) they compile to a trap. Pipelines with one multiplying warpgroup and the
    producer also build the tiles of 16 and 32 expert rows as wgmma's N."""
    names = fp8_wgmma_kernel_names(pipeline or WGMMA_PIPELINE)
    ptx = _compile("fp8_wgmma.cu", "sm_90a", tuple(f"-D{k}={v}" for k, v in pipeline),
                   want_ptx=True, names=names)
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in ptx
    for n in wgmma_rows_n_sizes(pipeline or WGMMA_PIPELINE):
        assert f"wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3" in ptx
    assert ptx.count(".entry") == len(names)

ROUTER_PIPELINE = (("RG_SPLIT", _ROUTER_GEMV_SPLIT), ("RG_ROWS", _ROUTER_GEMV_ROWS))


@pytest.mark.parametrize("filename,pipeline", [("fp8.cu", FP8_PIPELINE),
                                               ("syncfree.cu", PIPELINE),
                                               ("fp8_wgmma.cu", WGMMA_PIPELINE),
                                               ("router.cu", ROUTER_PIPELINE)])
def test_kernel_pipeline_defaults_are_the_packages(filename, pipeline):
    """A kernel's pipeline macros default to the pipeline the package passes (what its comments
    say, and what a compile without -D options, as above, checks)."""
    src = kernel_source(filename)
    for key, value in pipeline:
        found = re.search(rf"#ifndef {key}\s+#define {key} (\S+)", src)
        assert found and found.group(1) == str(value), (filename, key, found and found.group(1))


def _kernel_first_statements(src: str):
    """(the text before the parameter list, the first statement) of each __global__ function."""
    def close(i):
        depth = 0
        for j in range(i, len(src)):
            depth += src[j] == "("
            depth -= src[j] == ")"
            if depth == 0:
                return j
    for m in re.finditer(r"__global__", src):
        i = src.index("(", m.end())
        if "__launch_bounds__" in src[m.end():i]:
            i = src.index("(", close(i) + 1)
        body = src.index("{", close(i)) + 1
        yield src[m.end():i].split()[-1], src[body:src.index(";", body) + 1].strip()


@pytest.mark.parametrize("filename", sorted(KERNELS))
def test_every_kernel_first_waits_for_the_prior_grid(filename):
    """Inside graph capture the kernels launch with programmatic dependent launch (_compile.py):
    one that touched memory before wait_for_prior_grid() could read its inputs before the kernel
    writing them has finished."""
    src = (Path(zeromoe_cupy.__file__).parent / "kernels" / filename).read_text()
    found = list(_kernel_first_statements(src))
    assert found, filename
    for name, first in found:
        assert first == "wait_for_prior_grid();", (filename, name, first)


@pytest.mark.parametrize("arch,waits", [("sm_80", False), ("sm_90", True)])
def test_grid_dependency_instructions_only_from_sm_90(arch, waits):
    """Every kernel entry waits on sm_90 code (griddepcontrol is sm_90 PTX); sm_80 code has none."""
    ptx = _compile("syncfree.cu", arch, (), want_ptx=True)
    entries = ptx.count(".entry")
    assert entries == len(KERNELS["syncfree.cu"])
    assert ptx.count("griddepcontrol.wait") == (entries if waits else 0)
    assert ptx.count("griddepcontrol.launch_dependents") == (entries if waits else 0)


def test_kernel_params_convert_as_cupy_does():
    """The programmatic launch's argument block: NumPy scalars and 0-d arrays keep their type's
    bytes (float16 and bfloat16 too), Python bool / int / float become bool / long long (unsigned
    from 2**63) / double, None a null pointer (CuPy's rules); anything else is refused by name."""
    import ctypes

    import ml_dtypes
    import numpy as np
    from zeromoe_cupy._compile import kernel_params

    want = [(np.int32(-5), ctypes.c_int32, -5), (np.float32(1.5), ctypes.c_float, 1.5),
            (np.uint64(2**63 + 7), ctypes.c_uint64, 2**63 + 7), (True, ctypes.c_bool, True),
            (-(2**40), ctypes.c_longlong, -(2**40)), (0.1, ctypes.c_double, 0.1),
            (np.int64(3), ctypes.c_int64, 3), (np.float64(-2.25), ctypes.c_double, -2.25),
            (None, ctypes.c_void_p, None), (2**64 - 1, ctypes.c_uint64, 2**64 - 1),
            (np.array(7, np.int16), ctypes.c_int16, 7), (np.bool_(True), ctypes.c_bool, True)]
    pointers, values = kernel_params([a for a, _, _ in want])
    assert len(values) == len(want)
    for i, (_, ctype, value) in enumerate(want):
        assert ctypes.sizeof(values[i]) == ctypes.sizeof(ctype), i
        assert ctypes.cast(pointers[i], ctypes.POINTER(ctype)).contents.value == value, i
    # 2-byte floats: their bits, as CuPy passes them
    for x in (np.float16(-1.75), np.array(3.5, ml_dtypes.bfloat16)[()]):
        pointers, values = kernel_params([x])
        got = ctypes.string_at(pointers[0], 2)
        assert got == np.asarray(x).tobytes() and ctypes.sizeof(values[0]) == 2
    with pytest.raises(TypeError, match=r"args\[1\]: .*str"):
        kernel_params([np.int32(1), "x"])
    with pytest.raises(TypeError, match=r"args\[0\]: .*list"):
        kernel_params([[1, 2]])
    for big in (2**64, -(2**63) - 1):
        with pytest.raises(OverflowError, match=r"args\[2\]"):
            kernel_params([1, 2, big])


@pytest.mark.parametrize("dims,expected", [(4, (4, 1, 1)), ((2, 3), (2, 3, 1)),
                                           ((0, 5, 6), (1, 5, 6))])
def test_launch_dims_as_cupy_reads_them(dims, expected):
    from zeromoe_cupy._compile import _dim3
    assert _dim3("grid", dims) == expected


@pytest.mark.parametrize("dims", [2.5, (1, 2, 3, 4), (), (1, "2")])
def test_launch_dims_refused_by_name(dims):
    from zeromoe_cupy._compile import _dim3
    with pytest.raises(TypeError, match="block"):
        _dim3("block", dims)


def test_programmatic_launches_are_per_thread_and_restored():
    """The switch is the calling thread's (another thread keeps launching plainly) and is
    restored on exit, an exception's included; without a GPU it is never in effect."""
    import threading

    from zeromoe_cupy import _compile
    seen = []
    with _compile.programmatic_launches() as on:
        assert on is False or on is True
        t = threading.Thread(target=lambda: seen.append(
            getattr(_compile._launch_mode, "programmatic", False)))
        t.start()
        t.join()
        with pytest.raises(RuntimeError):
            with _compile.programmatic_launches(False) as inner:
                assert inner is False
                raise RuntimeError
        assert getattr(_compile._launch_mode, "programmatic", False) == on
    assert seen == [False]
    assert getattr(_compile._launch_mode, "programmatic", False) is False


def _compile(filename, arch, extra, want_ptx=False, names=None):
    """Compiles kernels/<filename> with ``names`` (default: KERNELS[filename]) instantiated."""
    names = KERNELS[filename] if names is None else names
    src = kernel_source(filename).encode()
    prog = _check(nvrtc.nvrtcCreateProgram(src, filename.encode(), 0, [], []))
    for name in names:
        _check(nvrtc.nvrtcAddNameExpression(prog, name.encode()))
    opts = [o.encode() for o in NVRTC_OPTIONS + extra] + [f"-arch={arch}".encode()] + \
        [f"-I{d}".encode() for d in _include_dirs()]
    (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    log_size = _check(nvrtc.nvrtcGetProgramLogSize(prog))
    # NVRTC writes into this buffer: at least 2 bytes, because CPython shares one bytes object
    # per single byte (b" " * 1 is that object), and writing into it changes every b" " of the
    # process (a safetensors header's padding, for one).
    log = b" " * max(log_size, 2)
    nvrtc.nvrtcGetProgramLog(prog, log)
    log = log.decode(errors="replace").strip("\x00 \n")
    assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS, log
    assert "warning" not in log.lower(), log
    for name in names:
        lowered = _check(nvrtc.nvrtcGetLoweredName(prog, name.encode()))
        assert lowered
    size = _check(nvrtc.nvrtcGetCUBINSize(prog))
    assert size > 1000
    ptx = None
    if want_ptx:
        ptx = b" " * _check(nvrtc.nvrtcGetPTXSize(prog))
        nvrtc.nvrtcGetPTX(prog, ptx)
        ptx = ptx.decode()
    nvrtc.nvrtcDestroyProgram(prog)
    return ptx


# System headers the kernels may include. A newer NVRTC here may compile more (its builtins
# carry e.g. <mma.h>'s crt/ part) than the one beside an older CUDA install accepts.
ALLOWED_INCLUDES = {"cuda_fp16.h", "cuda_bf16.h"}


@pytest.mark.parametrize("filename", sorted(KERNELS))
def test_kernels_include_only_portable_headers(filename):
    includes = {line.split("<", 1)[1].split(">", 1)[0]
                for line in kernel_source(filename).splitlines()
                if line.strip().startswith("#include <")}
    assert includes <= ALLOWED_INCLUDES, includes - ALLOWED_INCLUDES


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)])
@pytest.mark.parametrize("grouped,n", [(False, 768), (True, 256), (False, 20), (True, 1024),
                                       (False, 33)])
def test_routing_kernel_compiles_to_ptx(cc, grouped, n):
    # In a subprocess: this process may run Numba's simulator, which has no compile_ptx.
    # Numba compiles device functions for "the current device"; with no GPU, name one.
    code = (
        "import numba.cuda.dispatcher as d\n"
        f"d.get_current_device = lambda: type('Dev', (), {{'compute_capability': {cc}}})\n"
        "from numba import cuda\n"
        "from zeromoe_cupy._route_kernel import make_route_kernel\n"
        "from zeromoe_cupy.routing import route_kernel_signature, route_launch_bounds\n"
        f"kernel = make_route_kernel({grouped}, {n})\n"
        f"ptx, _ = cuda.compile_ptx(kernel, route_kernel_signature(), cc={cc},\n"
        f"                           launch_bounds=route_launch_bounds({grouped}, {n}))\n"
        "assert '.entry' in ptx, 'no kernel entry in the PTX'\n"
        "assert 'shfl.sync' in ptx, 'no warp shuffles in the PTX'\n"
        "print('ptx', len(ptx), 'local' if '.local' in ptx else 'no-local',\n"
        "      'v4' if 'ld.global.v4.f32' in ptx else 'scalar')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ptx ")
    # Nothing goes to local memory (the scores and the candidate cache stay in registers).
    assert "no-local" in res.stdout, res.stdout
    # Rows of N % 4 == 0 floats are read 16 bytes at a time.
    assert ("v4" in res.stdout.split()) == (n % 4 == 0), res.stdout
