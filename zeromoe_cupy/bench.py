"""`zeromoe bench`: the layer's time against the memory/FLOP floor of docs/spec.md, per token
count.

Workload (docs/spec.md, "The benchmark workload"): x ~ N(0, 1), random weights, correction bias 0
for real experts and one offset c for zero experts, found by bisection so that on average
``real_per_token`` of the K slots go to real experts. Times are medians of CUDA-event
timings after warm-up, with inputs rotated so that the L2 cache does not flatter us.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

import numpy as np

from ._arrays import DTYPES, cupy_module, gpu_available, gpu_unavailable_reason, np_dtype
from ._compile import memoize_per_device, raw_module
from .config import MoEConfig
from .experts import STRATEGIES

DEFAULT_TOKENS = (1, 16, 128, 1024, 4096, 16384)
# A peer is timed only if its output agrees with ours this closely (two implementations, each
# within docs/spec.md's tolerance of the exact result, may differ by about twice that).
PEER_AGREEMENT = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}
QUICK_TOKENS = (1, 128, 4096)
GRAPH_MAX_TOKENS = 1024  # --graph: sizes up to this are also timed as replayed CUDA graphs


CPU_MAX_TOKENS = 4096  # the NumPy path is slow: larger sizes are left out on the CPU
PEERS = ("torch", "vllm")


def token_list(text: str) -> list[int]:
    """argparse type of --tokens: comma-separated token counts, each an int >= 0."""
    try:
        tokens = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token counts (e.g. 1,128,4096), got {text!r}") from None
    if any(t < 0 for t in tokens):
        raise argparse.ArgumentTypeError(f"expected token counts >= 0, got {text!r}")
    return tokens


def peer_list(text: str) -> list[str]:
    """argparse type of --peers: a comma-separated list of PEERS."""
    names = [s for s in text.split(",") if s]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer {unknown[0]!r} (known: "
                                         f"{', '.join(PEERS)})")
    return names


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def add_arguments(p) -> None:
    p.add_argument("--preset", default=None, choices=MoEConfig.preset_names(),
                   help="default longcat-flash (tiny on the CPU)")
    p.add_argument("--tokens", type=token_list, default=None,
                   help="comma-separated token counts")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    p.add_argument("--real-per-token", type=nonnegative_float, default=None,
                   help="average real experts per token, at most K (default 8 for "
                        "longcat-flash, K*2/3 else)")
    p.add_argument("--peers", type=peer_list, default=[], help="comma list: torch (per-expert "
                   "loop + sort/_grouped_mm), vllm (its fused_experts), on the GPU, each if it "
                   "imports")
    p.add_argument("--graph", action="store_true",
                   help=f"also time replayed CUDA graphs (layer.graphed) up to "
                        f"{GRAPH_MAX_TOKENS} tokens")
    p.add_argument("--json", default=None, help="write every figure to this JSON file "
                   "(default, with neither --json nor --plot: bench-<preset>-<dtype>-<device>"
                   ".json in the current directory)")
    p.add_argument("--plot", default=None, help="write a log-log PNG plot (needs matplotlib; "
                   "default as --json, .png)")
    p.add_argument("--no-save", action="store_true",
                   help="the table only: no JSON file, no plot")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when a GPU is usable, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="expert path on the GPU")
    p.add_argument("--router-gemm", default="auto", choices=("auto", "fp32"),
                   help="see ZeroExpertMoE")
    p.add_argument("--deterministic", action="store_true",
                   help="the layer's deterministic mode (chunk-invariant bits; slower)")
    p.add_argument("--ep", type=int, default=None, metavar="N",
                   help="expert parallelism: N ranks on this host (one GPU each) against the "
                   "one-GPU layer (parallel/bench_ep.py)")
    p.add_argument("--ep-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quantization", choices=("fp8",), default=None,
                   help="fp8: time layer.quantize('fp8') against the fp8 floor (1 byte per "
                        "weight, the fp8 matmul rate), our unquantized layer beside it")


def check_arguments(parser, args) -> None:
    """What argparse cannot check alone, refused through parser.error (exit status 2):
    the device, sizes the CPU path does not run, peers, graphs, GPU strategies or expert
    parallelism without a GPU,
    output paths whose directory does not exist (checked before the run, not after it), and
    --real-per-token against the preset's K. Fills in args.device."""
    if args.device == "cuda" and not gpu_available():
        parser.error(f"argument --device: cuda: no usable CUDA GPU ({gpu_unavailable_reason()})")
    args.device = args.device or ("cuda" if gpu_available() else "cpu")
    if args.no_save and (args.json or args.plot):
        parser.error("argument --no-save: not with --json or --plot")
    plot_asked = args.plot is not None  # a default plot is skipped without matplotlib
    if args.json is None and args.plot is None and not args.no_save and not args.ep_worker:
        name = default_output_name(args)
        args.json = name + ".json"
        args.plot = None if args.ep else name + ".png"  # the EP table has no plot
    for option in ("json", "plot"):
        path = getattr(args, option)
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f"argument --{option}: cannot write {path!r} (expected a file name in "
                         f"an existing, writable directory)")
    if plot_asked and importlib.util.find_spec("matplotlib") is None:
        parser.error("argument --plot: needs matplotlib (pip install 'zeromoe-cupy[bench]')")
    if args.ep is not None and args.ep < 1:
        parser.error(f"argument --ep: expected an int >= 1, got {args.ep}")
    if args.ep is not None and args.device == "cpu":
        parser.error("argument --ep: expert parallelism in the benchmark runs only on GPUs "
                     "(one per rank; device cpu here)")
    if args.ep is not None and not args.ep_worker:
        from .parallel.launch import _check_gpus
        try:
            _check_gpus(args.ep, os.environ.get("CUDA_VISIBLE_DEVICES"), "--ep")
        except ValueError as exc:
            parser.error(f"argument {exc}")
    if args.device == "cpu":
        big = [t for t in args.tokens or () if t > CPU_MAX_TOKENS]
        if big:
            parser.error(f"argument --tokens: the CPU (NumPy) path runs at most "
                         f"{CPU_MAX_TOKENS} tokens, got {big[0]}")
        if args.peers:
            parser.error("argument --peers: peers run only on the GPU (device cpu here)")
        if args.graph:
            parser.error("argument --graph: CUDA graphs need the GPU (device cpu here)")
        if args.strategy not in ("auto", "fixed") and not args.deterministic:
            # the CPU path has one way (NumPy's matmul), and the fixed-order one
            parser.error(f"argument --strategy: {args.strategy!r} is a GPU path; the CPU "
                         f"(device cpu here) runs 'auto' (NumPy) or 'fixed'")
    if args.seed < 0:
        parser.error(f"argument --seed: expected an int >= 0, got {args.seed}")
    if args.real_per_token is not None:
        preset = preset_name(args.preset, args.device)
        K = MoEConfig.preset(preset).top_k
        if args.real_per_token > K:
            parser.error(f"argument --real-per-token: expected at most top_k = {K} of the "
                         f"{preset!r} preset, got {args.real_per_token:g}")
    if args.deterministic and (args.strategy not in ("auto", "fixed")
                               or args.router_gemm != "auto"):
        parser.error("argument --deterministic: picks its own kernels; leave --strategy and "
                     "--router-gemm at auto")


def preset_name(preset: str | None, device: str) -> str:
    """The preset a run times: the one asked for, else longcat-flash on the GPU and tiny on
    the CPU."""
    return preset or ("longcat-flash" if device == "cuda" else "tiny")


def default_output_name(args) -> str:
    """bench-<preset>-<dtype>-<device>[-fp8][-ep<N>] in the current directory: the files a
    run without --json, --plot or --no-save writes (.json, .png)."""
    preset = preset_name(args.preset, args.device)
    dtype = args.dtype or MoEConfig.preset(preset).dtype
    parts = ["bench", preset, dtype, args.device]
    if args.quantization:
        parts.append(args.quantization)
    if args.ep:
        parts.append(f"ep{args.ep}")
    return "-".join(parts)


def weight_bytes(cfg) -> int:
    """Bytes of the weights a layer of ``cfg`` holds: the router and the real experts (the
    biases and the zero experts' few rows left out)."""
    from .checkpoint import layer_weight_specs
    specs = layer_weight_specs(cfg)
    names = ["router_weight", "w13", "w2"]
    if cfg.router_hidden_size is not None:
        names.append("router_hidden_weight")
    if cfg.quantization is not None:
        names += ["w13_scale_inv", "w2_scale_inv"]
    return sum(int(np.prod(specs[n][0])) * specs[n][1].itemsize for n in names)


def calibrate_zero_bias(layer, real_per_token: float, n_tokens: int = 4096, seed: int = 1):
    """Set the zero experts' shared correction offset so ~real_per_token slots are real."""
    cfg, xp = layer.config, layer.xp
    E, N = cfg.num_experts, cfg.num_total_experts
    x = _normal(xp, (n_tokens, cfg.hidden_size), np_dtype(cfg.dtype), seed)
    logits = layer._logits(x)

    def real_share(c):
        bias = xp.zeros(N, np.float32)
        bias[E:] = c
        # The layer's own routing (its options included), with this bias; a config without
        # a correction bias gets one here: the benchmark workload defines it (docs/spec.md).
        layer.e_score_correction_bias = bias
        r = layer._route_logits(logits)
        return float((r.topk_ids < E).sum()) / n_tokens, bias

    lo, hi = -1.0, 1.0  # scores lie in [0, 1]: beyond +-1 the offset decides alone
    for _ in range(40):
        mid = (lo + hi) / 2
        share, _ = real_share(mid)
        if share > real_per_token:
            lo = mid  # too many real slots: raise the zero experts
        else:
            hi = mid
    share, bias = real_share((lo + hi) / 2)
    layer.e_score_correction_bias = bias
    return (lo + hi) / 2, share


def _normal(xp, shape, dtype, seed):
    rng = xp.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


class _Timer:
    """Median time of fn() in ms: CUDA events on the GPU, perf_counter on the CPU.

    With ``batch`` > 1 each timing spans that many back-to-back calls and is divided by it:
    the device time per call once the host runs ahead (throughput), where batch 1 gives the
    latency of one call, host work included.
    """

    def __init__(self, gpu: bool, warmup: int, repeat: int, batch: int = 1):
        self.gpu, self.warmup, self.repeat, self.batch = gpu, warmup, repeat, batch

    def __call__(self, fn, inputs):
        for i in range(self.warmup):
            fn(inputs[i % len(inputs)])
        times = []
        if self.gpu:
            cp = cupy_module()
            cp.cuda.get_current_stream().synchronize()
            for i in range(self.repeat):
                start, stop = cp.cuda.Event(), cp.cuda.Event()
                start.record()
                for b in range(self.batch):
                    fn(inputs[(i * self.batch + b) % len(inputs)])
                stop.record()
                stop.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, stop) / self.batch)
        else:
            for i in range(self.repeat):
                t0 = time.perf_counter()
                fn(inputs[i % len(inputs)])
                times.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(times))


# The ceilings: each is the best of a few standard ways of doing the same work, so that the
# floor does not depend on one library's choice. A copy method is (nbytes, timer) -> B/s, read
# plus write counted; a matmul method is ((m, n, k), dtype name, timer) -> FLOP/s, or None for
# a dtype it does not handle (a method for float8_e4m3fn joins MATMUL_METHODS the same way).
COPY_SIZES = (256 << 20, 1 << 30, 4 << 30)  # bytes of the source
# (m, n, k): squares, and the LongCat-Flash expert GEMMs at 16384 rows (n = 2I, k = H; n = H,
# k = I).
MATMUL_SHAPES = ((8192, 8192, 8192), (16384, 8192, 8192), (16384, 4096, 6144),
                 (16384, 6144, 2048))
_MEMORY_MARGIN = 1 << 30  # left free beside a ceiling's buffers


def _copy_method(copy):
    """A copy method from copy(src, dst) on nbytes-long uint8 device buffers."""
    def timed(nbytes, timer):
        cp = cupy_module()
        src = cp.ones(nbytes, cp.uint8)
        dst = cp.empty_like(src)
        return timer(lambda _: copy(src, dst), [None])

    def method(nbytes, timer):
        ms = timed(nbytes, timer)
        cupy_module().get_default_memory_pool().free_all_blocks()  # room for the next size
        return 2 * nbytes / (ms * 1e-3)
    return method


def _memcpy_async(src, dst):
    cp = cupy_module()
    rt = cp.cuda.runtime
    rt.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, rt.memcpyDeviceToDevice,
                   cp.cuda.get_current_stream().ptr)


@memoize_per_device
def _copy_kernel():
    cp = cupy_module()
    kernel = raw_module("copy.cu", ["copy_16byte"]).get_function("copy_16byte")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    return kernel, 8 * sms  # 8 blocks of 256 threads: a full SM of threads on sm_80 / sm_90


def _copy_16byte(src, dst):
    kernel, blocks = _copy_kernel()
    kernel((blocks,), (256,), (src, dst, np.int64(src.nbytes // 16)))


COPY_METHODS = {
    "cudaMemcpyAsync": _copy_method(_memcpy_async),
    "copy_16byte_kernel": _copy_method(_copy_16byte),
    "cupy_assign": _copy_method(lambda src, dst: dst.__setitem__(Ellipsis, src)),
}


def _matmul_method(setup):
    """A matmul method from setup(m, n, k, dtype name) -> a call that does one product (inputs
    in the dtype, fp32 accumulation), or None where the method does not handle the dtype."""
    def method(shape, dtype, timer):
        m, n, k = shape
        call = setup(m, n, k, dtype)
        if call is None:
            return None
        ms = timer(lambda _: call(), [None])
        return 2 * m * n * k / (ms * 1e-3)
    return method


def _cupy_matmul(m, n, k, dtype):
    # CUPY_TF32 would turn CuPy's fp32 products into TF32 ones: not an fp32 rate.
    if dtype not in DTYPES or (dtype == "float32" and int(os.getenv("CUPY_TF32", "0")) > 0):
        return None
    cp = cupy_module()
    a = _normal(cp, (m, k), np_dtype(dtype), 2)
    b = _normal(cp, (k, n), np_dtype(dtype), 3)
    return lambda: cp.matmul(a, b)


def _cublas_gemm_ex(m, n, k, dtype):
    if dtype not in DTYPES:
        return None
    from ._cublas import gemm_nt
    cp = cupy_module()
    x = _normal(cp, (m, k), np_dtype(dtype), 2)
    w = _normal(cp, (n, k), np_dtype(dtype), 3)
    out = cp.empty((m, n), np_dtype(dtype))
    return lambda: gemm_nt(w, x, out, allow_tf32=False)  # out = x @ w^T


def _cublaslt_fp8(m, n, k, dtype):
    """Block-scaled FP8 (the fp8 experts' GEMM: 128x128 weight blocks, 1x128 activation
    groups, bf16 out) through cuBLASLt; None for other dtypes or where cuBLASLt refuses."""
    if dtype != "float8_e4m3fn":
        return None
    from . import _cublas
    cp = cupy_module()
    w = cp.full((n, k), 0x38, np.uint8)  # e4m3 bytes of 1.0
    x = cp.full((m, k), 0x38, np.uint8)
    ws = cp.ones((n // 128, k // 128), np.float32)
    xs = cp.ones(m * (k // 128), np.float32)
    out = cp.empty((m, n), np_dtype("bfloat16"))
    try:
        _cublas.fp8_gemm_nt(w, ws, x, xs, out, m)
    except _cublas.CublasLtError as exc:
        print(f"fp8 matmul: cuBLASLt refused ({exc})")
        return None
    return lambda: _cublas.fp8_gemm_nt(w, ws, x, xs, out, m)


MATMUL_METHODS = {
    "cupy.matmul": _matmul_method(_cupy_matmul),
    "cublasGemmEx": _matmul_method(_cublas_gemm_ex),
    "cublasLt_block_fp8": _matmul_method(_cublaslt_fp8),
}


def _fits(nbytes: int) -> bool:
    cp = cupy_module()
    cp.get_default_memory_pool().free_all_blocks()
    return nbytes + _MEMORY_MARGIN <= cp.cuda.runtime.memGetInfo()[0]


def _best(rates: dict, what: str, case: str) -> dict:
    """{method: {case label: rate or None}} -> {"best": rate, "method": name, case: its label,
    "all": {method: its best rate}, "by_" + case: rates}; a method with no rate is left out."""
    by_case = {name: {c: r for c, r in cases.items() if r is not None}
               for name, cases in rates.items()}
    by_case = {name: cases for name, cases in by_case.items() if cases}
    if not by_case:
        raise ValueError(f"{what}: no method measured a rate (methods: {sorted(rates)})")
    every = {name: max(cases.values()) for name, cases in by_case.items()}
    method = max(every, key=every.get)
    return {"best": every[method], "method": method,
            case: max(by_case[method], key=by_case[method].get), "all": every,
            "by_" + case: by_case}


def measure_copy(quick: bool, sizes=None) -> dict:
    """Device-to-device copy bandwidth (B/s, read + write) as the best of COPY_METHODS.

    Args:
        quick: fewer repeats.
        sizes: source sizes in bytes; default COPY_SIZES, less those that do not fit in the
            free GPU memory.

    Returns:
        {"best": B/s, "method": name, "size": "<n>MiB", "all": {method: its best B/s},
        "by_size": {method: {"<n>MiB": B/s}}}.
    """
    if sizes is None:
        sizes = [s for s in COPY_SIZES if _fits(2 * s)]
    timer = _Timer(True, 3, 10 if quick else 30)
    rates = {name: {f"{s >> 20}MiB": method(s, timer) for s in sizes}
             for name, method in COPY_METHODS.items()}
    return _best(rates, "copy", "size")


def measure_matmul(dtype, quick: bool, shapes=None) -> dict:
    """A large matmul's rate (FLOP/s, 2*m*n*k per product) as the best of MATMUL_METHODS.

    Args:
        dtype: a dtype or its name; the inputs and the output have it, products accumulate in
            fp32 (no TF32 for float32: CuPy's own matmul is left out when CUPY_TF32 is set).
        quick: fewer repeats.
        shapes: (m, n, k) products out[m, n] = x[m, k] @ w[n, k]^T; default MATMUL_SHAPES,
            less those that do not fit.

    Returns:
        {"best": FLOP/s, "method": name, "shape": "MxNxK", "all": {method: its best FLOP/s},
        "by_shape": {method: {"MxNxK": FLOP/s}}, "dtype": name}.

    Raises:
        ValueError: no method handles dtype.
    """
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if shapes is None:  # 4 bytes an element bounds every dtype's inputs and output
        shapes = [(m, n, k) for m, n, k in MATMUL_SHAPES if _fits(4 * (m * k + n * k + m * n))]
    timer = _Timer(True, 3, 10 if quick else 30)
    rates = {m: {"x".join(map(str, s)): method(s, name, timer) for s in shapes}
             for m, method in MATMUL_METHODS.items()}
    return {**_best(rates, f"{name} matmul", "shape"), "dtype": name}


def measure_ceilings(dtype, quick: bool, copy_sizes=None, matmul_shapes=None) -> dict:
    """Both ceilings of docs/spec.md's floor: {"copy": measure_copy(...), "matmul":
    measure_matmul(dtype, ...)}; the floor takes each one's "best"."""
    return {"copy": measure_copy(quick, copy_sizes),
            "matmul": measure_matmul(dtype, quick, matmul_shapes)}


def format_ceilings(ceilings) -> str:
    """Two lines: each ceiling's best, the way that won and where, the others beside it."""
    copy, mm = ceilings["copy"], ceilings["matmul"]
    lines = []
    for c, what, case, unit, fmt in ((copy, "copy", "size", "TB/s", ".2f"),
                                     (mm, f"{mm['dtype']} matmul", "shape", "TFLOP/s", ".0f")):
        others = ", ".join(f"{name} {rate / 1e12:{fmt}}" for name, rate in c["all"].items()
                           if name != c["method"])
        lines.append(f"{what} {c['best'] / 1e12:{fmt}} {unit} by {c['method']} at {c[case]}"
                     + (f" (others at their best: {others})" if others else ""))
    return "\n".join(lines)


def floor_time(cfg, ids_host, bandwidth, rate):
    """docs/spec.md's floor: max(bytes / bandwidth, flops / rate), seconds. FP8 layers count 1
    byte per expert weight plus 4 per 128x128 block scale (``rate``: the fp8 matmul's)."""
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    item = np_dtype(cfg.dtype).itemsize
    T = ids_host.shape[0]
    real = ids_host[ids_host < E]
    distinct = np.unique(real).size
    if cfg.quantization == "fp8":
        hb, ib = -(-H // 128), -(-I // 128)
        expert_bytes = 3 * H * I + 4 * (2 * ib * hb + hb * ib)
    else:
        expert_bytes = 3 * H * I * item
    bytes_ = distinct * expert_bytes + 2 * T * H * item
    flops = 2 * T * H * cfg.num_total_experts + 6 * H * I * real.size
    return max(bytes_ / bandwidth, flops / rate), bytes_, flops


def run(args) -> int:
    import zeromoe_cupy as zm

    if getattr(args, "ep", None):
        from .parallel import bench_ep
        return bench_ep.worker(args) if args.ep_worker else bench_ep.run_ep(args)

    device = args.device or ("cuda" if gpu_available() else "cpu")
    gpu = device == "cuda"
    preset = preset_name(args.preset, device)
    overrides = {"dtype": args.dtype} if args.dtype else {}
    cfg = zm.MoEConfig.preset(preset, **overrides)
    tokens = args.tokens or list(QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
    if not gpu:
        print("No GPU in use: these are CPU (NumPy) numbers, on the "
              f"'{preset}' preset; they say nothing about GPU speed.")
        if not args.tokens and any(t > CPU_MAX_TOKENS for t in tokens):
            tokens = [t for t in tokens if t <= CPU_MAX_TOKENS]
            print(f"Sizes above {CPU_MAX_TOKENS} tokens are left out on the CPU.")
    real_per_token = args.real_per_token
    if real_per_token is None:
        real_per_token = 8.0 if preset == "longcat-flash" else cfg.top_k * 2 / 3
    xp = cupy_module() if gpu else np
    quantized = f", {args.quantization} experts" if getattr(args, "quantization", None) else ""
    print(f"building {preset} ({cfg.dtype}{quantized}) on {device} ...", flush=True)
    try:
        layer = zm.ZeroExpertMoE(cfg, seed=args.seed, device=device,
                                 expert_strategy=args.strategy, router_gemm=args.router_gemm,
                                 deterministic=args.deterministic)
    except MemoryError:  # NumPy's and CuPy's out-of-memory errors both derive from it
        smaller = "" if preset == "tiny" else "; try --preset tiny"
        print(f"zeromoe bench: out of {'GPU' if gpu else 'host'} memory building the "
              f"{preset!r} preset: its weights alone take {weight_bytes(cfg) / 1e9:.1f} GB "
              f"({cfg.dtype}){smaller}", file=sys.stderr)
        return 1
    offset, share = calibrate_zero_bias(layer, real_per_token)
    print(f"zero-expert bias offset {offset:+.4f}: {share:.2f} of {cfg.top_k} slots real",
          flush=True)
    unquantized = None
    if getattr(args, "quantization", None):
        unquantized, layer = layer, layer.quantize(args.quantization)
        cfg = layer.config
    result = {"preset": preset, "dtype": cfg.dtype, "device": device, "strategy": args.strategy,
              "router_gemm": args.router_gemm, "deterministic": args.deterministic,
              "real_per_token_target": real_per_token, "real_per_token": share,
              "zero_bias_offset": offset, "versions": _versions(), "rows": [],
              "quantization": cfg.quantization}
    if gpu:
        cp = xp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
        result["gpu"] = props["name"].decode()
        ceilings = measure_ceilings(cfg.dtype, args.quick)
        bandwidth, rate = ceilings["copy"]["best"], ceilings["matmul"]["best"]
        result.update(copy_bandwidth_Bps=bandwidth, matmul_flops=rate, ceilings=ceilings)
        print(f"{result['gpu']}, ceilings of the floor (the best way of each, this run):\n"
              f"{format_ceilings(ceilings)}", flush=True)
        if unquantized is not None:  # the FLOP term of the fp8 floor: the fp8 matmul's rate
            fp8 = measure_matmul("float8_e4m3fn", args.quick)
            rate = fp8["best"]
            result.update(fp8_matmul_flops=rate, fp8_matmul=fp8)
            print(f"fp8 matmul {rate / 1e12:.0f} TFLOP/s by {fp8['method']} at {fp8['shape']}",
                  flush=True)
            unquantized.warmup()
        layer.warmup()
    else:
        bandwidth = rate = None
    peers = _make_peers(args.peers, layer) if gpu and args.peers else {}
    graph_sizes = [t for t in tokens if t <= GRAPH_MAX_TOKENS] if gpu and args.graph else []
    graphed = layer.graphed(capture_sizes=graph_sizes) if graph_sizes else None
    timer = _Timer(gpu, 3 if args.quick else 10, 10 if args.quick else 50)
    for T in tokens:
        print(f"T={T} ...", flush=True)
        # Enough rotating inputs that x alone exceeds the L2 cache (~60 MB) at small T.
        n_sets = int(min(16, max(2, (128 << 20) // max(1, T * cfg.hidden_size * 2))))
        xs = [_normal(xp, (T, cfg.hidden_size), np_dtype(cfg.dtype), 100 + i)
              for i in range(n_sets if gpu else 2)]
        # A layer with a gating residual is timed as a middle layer: with previous logits.
        prev = _normal(xp, (T, cfg.num_total_experts), np.float32, 7) \
            if cfg.gating_residual else None
        ids0 = layer.route(xs[0], prev_router_logits=prev).topk_ids  # the timed routing
        ids_host = ids0.get() if gpu else ids0
        real = float((ids_host < cfg.num_experts).sum(axis=1).mean()) if T else float("nan")
        row = {"tokens": T, "real_slots_per_token": real}
        if gpu:
            cp.get_default_memory_pool().free_all_blocks()
            before = cp.get_default_memory_pool().total_bytes()
        forward = layer if prev is None else (lambda x: layer(x, prev_router_logits=prev))
        row["forward_ms"] = timer(forward, xs)
        if gpu:
            row["workspace_bytes"] = int(cp.get_default_memory_pool().total_bytes() - before)
        row.update(_stage_times(layer, xs, timer, prev))
        if unquantized is not None:
            row["unquantized_forward_ms"] = timer(unquantized, xs)
            row["rel_err_vs_unquantized"] = _quantization_error(layer, unquantized, xs[0], prev)
        if gpu:
            floor, bytes_, flops = floor_time(cfg, ids_host, bandwidth, rate)
            row.update(floor_ms=floor * 1e3, floor_bytes=bytes_, floor_flops=flops,
                       ratio_to_floor=row["forward_ms"] / (floor * 1e3))
            if graphed is not None and T in graph_sizes:
                row["graph_ms"] = timer(graphed, xs)
                row["graph_ratio_to_floor"] = row["graph_ms"] / row["floor_ms"]
            for name, peer in peers.items():
                err = _check_peer(peer, layer, xs[0])
                row[f"peer_{name}_rel_err"] = err
                if not err <= PEER_AGREEMENT[cfg.dtype]:  # NaN fails too
                    print(f"peer {name} disagrees with the layer at T={T} (rel. error "
                          f"{err:.2e}): not timed")
                    row[f"peer_{name}_ms"] = row[f"peer_{name}_over_ours"] = float("nan")
                    continue
                row[f"peer_{name}_ms"] = timer(peer, xs)
                row[f"peer_{name}_over_ours"] = row[f"peer_{name}_ms"] / row["forward_ms"]
        result["rows"].append(row)
    _print_table(result, list(peers), graphed is not None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        _plot(result, list(peers), args.plot)
    return 0


STAGES = ("route", "permute", "gemm1", "activation", "gemm2", "combine")


def _stage_times(layer, xs, timer, prev=None):
    """Median time of each stage of the forward, from marks between the stages.

    One instrumented forward per repeat: route, then the expert stage's own marks, then the
    combine. On the GPU each mark records a CUDA event, so a stage's time is the wall time
    between its enqueue and the previous stage's (host work included where it stalls).
    """
    from .experts import run_experts
    from .zero_experts import combine, scaled_input
    cfg = layer.config
    cp = cupy_module() if timer.gpu else None
    samples = {name: [] for name in STAGES}
    for i in range(timer.warmup + timer.repeat):
        marks = []

        def mark(name, marks=marks):
            if cp is not None:
                ev = cp.cuda.Event()
                ev.record()
                marks.append((name, ev))
            else:
                marks.append((name, time.perf_counter()))

        x = xs[i % len(xs)]
        mark("start")
        r = layer.route(x, prev_router_logits=prev)
        mark("route")
        x = scaled_input(x, cfg.expert_input_scale)  # counted in "permute"
        scales = None if layer.w13_scale_inv is None else (layer.w13_scale_inv,
                                                           layer.w2_scale_inv)
        out = run_experts(x, r.topk_ids, layer.w13, layer.w2, r.expert_counts,
                          strategy=layer.expert_strategy, stage_marks=mark, scales=scales)
        combine(x, r.topk_ids, r.topk_weights, cfg.num_experts, cfg.zero_types, out,
                layer.const_vec, layer.const_gate, num_zero_experts=cfg.num_zero_experts,
                check_ids=False)
        mark("combine")
        if i < timer.warmup:
            continue
        if cp is not None:
            marks[-1][1].synchronize()
        for (_, a), (name, b) in zip(marks, marks[1:]):
            ms = cp.cuda.get_elapsed_time(a, b) if cp is not None else (b - a) * 1e3
            samples[name].append(ms)
    return {f"{name}_ms": float(np.median(v)) for name, v in samples.items()}


def _versions():
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("cupy", "numba", "ml_dtypes", "torch"):
        mod = sys.modules.get(name)
        if mod is None and name != "torch":
            try:
                mod = __import__(name)
            except Exception:
                mod = None
        out[name] = getattr(mod, "__version__", None) if mod else None
    return out


def _make_peers(names, layer):
    from . import _torch_peers
    if isinstance(names, str):  # a comma list, as on the command line
        names = peer_list(names)
    return _torch_peers.make(names, layer)


def _quantization_error(layer, unquantized, x, prev):
    """||y - y_unquantized|| / ||y_unquantized|| on x: the quantization's own error (the
    layers share the router; the same previous logits where the preset has a residual)."""
    from .reference import relative_error
    kw = {} if prev is None else {"prev_router_logits": prev}
    ys = [L(x, **kw) for L in (layer, unquantized)]
    return relative_error(*(y.get() if hasattr(y, "get") else y for y in ys))


def _check_peer(peer, layer, x):
    from .reference import relative_error
    y = layer(x)
    theirs = cupy_module().from_dlpack(peer(x))
    return relative_error(theirs.get().astype(np.float32), y.get().astype(np.float32))


def _print_table(result, peers, graph=False):
    gpu = result["device"] == "cuda"
    head = f"{'T':>6} {'fwd ms':>9}" + "".join(f" {s[:7]:>7}" for s in STAGES)
    if gpu:
        head += f" {'floor ms':>9} {'x floor':>7} {'MiB ws':>7}"
        if graph:
            head += f" {'graph ms':>9} {'x floor':>7}"
        if result.get("quantization"):
            head += f" {'unquant ms':>10} {'speedup':>7}"
        for p in peers:
            head += f" {p + ' ms':>14} {p + '/ours':>12}"
    if result.get("quantization"):
        head += f" {'err vs unquant':>14}"
    print(head)
    for r in result["rows"]:
        line = f"{r['tokens']:>6} {r['forward_ms']:>9.3f}" + "".join(
            f" {r[s + '_ms']:>7.3f}" for s in STAGES)
        if gpu:
            line += (f" {r['floor_ms']:>9.3f} {r['ratio_to_floor']:>7.2f} "
                     f"{r['workspace_bytes'] / 2**20:>7.0f}")
            if graph:
                line += (f" {r['graph_ms']:>9.3f} {r['graph_ratio_to_floor']:>7.2f}"
                         if "graph_ms" in r else f" {'-':>9} {'-':>7}")
            if result.get("quantization"):
                line += (f" {r['unquantized_forward_ms']:>10.3f} "
                         f"{r['unquantized_forward_ms'] / r['forward_ms']:>7.2f}")
            for p in peers:
                line += f" {r[f'peer_{p}_ms']:>14.3f} {r[f'peer_{p}_over_ours']:>12.2f}"
        if result.get("quantization"):
            line += f" {r['rel_err_vs_unquantized']:>14.1e}"
        print(line)


def _plot(result, peers, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'zeromoe-cupy[bench]'): no plot")
        return
    T = [r["tokens"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(T, [r["forward_ms"] for r in result["rows"]], "o-", label="zeromoe_cupy")
    if result["device"] == "cuda":
        ax.loglog(T, [r["floor_ms"] for r in result["rows"]], "k--", label="floor")
        for p in peers:
            ax.loglog(T, [r[f"peer_{p}_ms"] for r in result["rows"]], "s-", label=p)
    ax.set_xlabel("tokens")
    ax.set_ylabel("ms")
    ax.set_title(f"{result['preset']} {result['dtype']} on {result.get('gpu', 'CPU')}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
