"""FP8 experts on the GPU: `probe` (cuBLASLt block-scaled FP8: statuses, scale layouts, a
strided batch, per-call times) and `timing` (LongCat-Flash shapes: fp8 vs bf16 against the
fp8 floor, and the fp8 error against the float64 evaluation on sampled tokens).

    python benchmarks/fp8_gpu.py probe
    python benchmarks/fp8_gpu.py timing [T,T,...]
    python benchmarks/fp8_gpu.py compare T,T,...   (short: the fp8 kernels side by side)
"""
import argparse
import ctypes
import time

import cupy as cp
import ml_dtypes
import numpy as np

from zeromoe_cupy import _cublas, bench, quant
from zeromoe_cupy.reference import relative_error

BF16 = np.dtype(ml_dtypes.bfloat16)


def _operands(rng, m, n, k):
    W = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    X = rng.standard_normal((m, k)).astype(np.float32)
    qW, sW = quant.quantize_weight(W)
    qX, sX = quant.quantize_activations(X)
    Wd = quant.dequantize_weight(qW, sW).astype(np.float64)
    Xd = qX.astype(np.float64) * np.repeat(sX, 128, 1)
    return qW, sW, qX, sX, Xd @ Wd.T


def probe():
    lt = _cublas.lt_library()
    lt.cublasLtGetVersion.restype = ctypes.c_size_t
    print("libcublasLt:", lt._name, "version", lt.cublasLtGetVersion())
    print("device:", cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
          "cc", cp.cuda.Device().compute_capability)
    rng = np.random.default_rng(0)
    m, n, k = 64, 256, 512
    qW, sW, qX, sX, ref = _operands(rng, m, n, k)
    variants = {
        "W scales [n/128,k/128], X scales M-major [k/128,m]": (sW, sX.T),
        "W scales transposed [k/128,n/128], X M-major": (sW.T, sX.T),
        "W scales [n/128,k/128], X scales K-major [m,k/128]": (sW, sX),
    }
    for name, (ws, xs) in variants.items():
        out = cp.empty((m, n), BF16)
        try:
            _cublas.fp8_gemm_nt(cp.asarray(qW.view(np.uint8)), cp.asarray(np.ascontiguousarray(ws)),
                                cp.asarray(qX.view(np.uint8)), cp.asarray(np.ascontiguousarray(xs)).ravel(),
                                out, m)
            cp.cuda.runtime.deviceSynchronize()
            print(f"probe {name}: rel err vs dequantized float64 "
                  f"{relative_error(out.get().astype(np.float32), ref):.2e}")
        except _cublas.CublasLtError as exc:
            print(f"probe {name}: REFUSED {exc} (status {exc.status})")
    for mm, nn, kk in ((6, 256, 512), (64, 200, 512), (64, 256, 200)):
        try:
            q = cp.zeros((nn, kk), np.uint8)
            _cublas.fp8_gemm_nt(q, cp.ones((-(-nn // 128), -(-kk // 128)), np.float32),
                                cp.zeros((mm, kk), np.uint8),
                                cp.ones(mm * -(-kk // 128), np.float32),
                                cp.empty((mm, nn), BF16), mm)
            cp.cuda.runtime.deviceSynchronize()
            print(f"probe m={mm} n={nn} k={kk}: accepted")
        except _cublas.CublasLtError as exc:
            print(f"probe m={mm} n={nn} k={kk}: REFUSED {exc}")
    _probe_batch(rng)
    # Per-call time at LongCat expert shapes (gate/up: n = 4096, k = 6144) and the 8192^3 rate.
    for mm in (64, 256, 1024, 4096):
        q = cp.zeros((4096, 6144), np.uint8)
        xq = cp.zeros((mm, 6144), np.uint8)
        out = cp.empty((mm, 4096), BF16)
        ws, xs = cp.ones((32, 48), np.float32), cp.ones(mm * 48, np.float32)
        f = lambda _: _cublas.fp8_gemm_nt(q, ws, xq, xs, out, mm)  # noqa: E731
        ms = bench._Timer(True, 3, 20)(f, [None])
        print(f"lt fp8 m={mm} n=4096 k=6144: {ms * 1e3:.1f} us, "
              f"{2 * mm * 4096 * 6144 / ms / 1e9:.0f} TFLOP/s")
    try:
        rate = bench.measure_matmul("float8_e4m3fn", quick=True, shapes=[(8192, 8192, 8192)])
        print(f"lt fp8 8192^3: {rate['best'] / 1e12:.0f} TFLOP/s")
    except ValueError as exc:
        print(f"lt fp8 8192^3: {exc}")


def _probe_batch(rng):
    """Does the block-scaled matmul take a strided batch, and where does batch 1 read its
    scales? Batch of 2 over [n, k] weights and [m, k] inputs, scales laid end to end."""
    m, n, k = 64, 256, 512
    ops = [_operands(rng, m, n, k) for _ in range(2)]
    W = cp.asarray(np.stack([o[0].view(np.uint8) for o in ops]))
    X = cp.asarray(np.stack([o[2].view(np.uint8) for o in ops]))
    WS = cp.asarray(np.stack([o[1] for o in ops]))
    XS = cp.asarray(np.stack([np.ascontiguousarray(o[3].T) for o in ops]))
    out = cp.empty((2, m, n), BF16)
    handle, workspace, _ = _cublas._lt_state(cp.cuda.runtime.getDevice())
    try:
        plan = _cublas._LtPlan(handle, m, n, k, _cublas.CUDA_R_16BF, workspace.data.ptr)
        setl = getattr(lt_lib(), "cublasLtMatrixLayoutSetAttribute")
        setl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        for layout, stride in ((plan.a, n * k), (plan.b, m * k), (plan.d, m * n)):
            for attr, val in ((5, ctypes.c_int32(2)), (6, ctypes.c_int64(stride))):
                st = setl(layout, attr, ctypes.byref(val), ctypes.sizeof(val))
                if st:
                    print(f"batch probe: MatrixLayoutSetAttribute({attr}) status {st}")
        # A new heuristic for the batched layouts.
        pref = _cublas._lt_create("cublasLtMatmulPreferenceCreate")
        _cublas._set("cublasLtMatmulPreferenceSetAttribute", pref, 1,
                     ctypes.c_uint64(_cublas.LT_WORKSPACE_BYTES))
        result = (ctypes.c_ubyte * 96)()
        count = ctypes.c_int(0)
        _cublas._lt("cublasLtMatmulAlgoGetHeuristic", handle, plan.desc, plan.a, plan.b,
                    plan.d, plan.d, pref, 1, result, ctypes.byref(count))
        print(f"batch probe: heuristic gives {count.value} algorithm(s)")
        _cublas._set("cublasLtMatmulDescSetAttribute", plan.desc, 17,
                     ctypes.c_void_p(WS.data.ptr))
        _cublas._set("cublasLtMatmulDescSetAttribute", plan.desc, 18,
                     ctypes.c_void_p(XS.data.ptr))
        alpha, beta = ctypes.c_float(1), ctypes.c_float(0)
        _cublas._lt("cublasLtMatmul", handle, plan.desc, ctypes.byref(alpha), W.data.ptr,
                    plan.a, X.data.ptr, plan.b, ctypes.byref(beta), out.data.ptr, plan.d,
                    out.data.ptr, plan.d, result, workspace.data.ptr,
                    _cublas.LT_WORKSPACE_BYTES, 0)
        cp.cuda.runtime.deviceSynchronize()
        y = out.get().astype(np.float32)
        own = [ops[b][4] for b in range(2)]
        # batch 1 computed with batch 0's scales instead of its own:
        q1W, s0W, q1X, s0X = ops[1][0], ops[0][1], ops[1][2], ops[0][3]
        shared = (q1X.astype(np.float64) * np.repeat(s0X, 128, 1)) @ \
            quant.dequantize_weight(q1W, s0W).astype(np.float64).T
        print(f"batch probe: batch 0 err {relative_error(y[0], own[0]):.2e}; batch 1 err with "
              f"its own scales {relative_error(y[1], own[1]):.2e}, with batch 0's "
              f"{relative_error(y[1], shared):.2e}")
    except _cublas.CublasLtError as exc:
        print(f"batch probe: REFUSED {exc}")


def lt_lib():
    return _cublas.lt_library()


def timing(tokens):
    import zeromoe_cupy as zm
    from zeromoe_cupy.experts import fp8 as fp8_path
    fp8_path.LT_INEXACT_SUMS = True  # "padded" through cuBLASLt (inexact sums on 9.x)
    cfg = zm.MoEConfig.preset("longcat-flash")
    t0 = time.time()
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
    bench.calibrate_zero_bias(layer, 8.0)
    layer8 = layer.quantize("fp8")
    cp.cuda.runtime.deviceSynchronize()
    print(f"built and quantized in {time.time() - t0:.1f} s; fp8 expert bytes "
          f"{(layer8.w13.nbytes + layer8.w2.nbytes) / 1e9:.1f} GB (bf16 "
          f"{(layer.w13.nbytes + layer.w2.nbytes) / 1e9:.1f} GB)", flush=True)
    ceilings = bench.measure_ceilings("bfloat16", quick=True,
                                      matmul_shapes=[(8192, 8192, 8192)])
    bandwidth, rate_bf16 = ceilings["copy"]["best"], ceilings["matmul"]["best"]
    rate8 = bench.measure_matmul("float8_e4m3fn", quick=True,
                                 shapes=[(8192, 8192, 8192), (16384, 4096, 6144)])["best"]
    print(f"copy {bandwidth / 1e12:.2f} TB/s, bf16 {rate_bf16 / 1e12:.0f} TFLOP/s, "
          f"fp8 {rate8 / 1e12:.0f} TFLOP/s", flush=True)
    layer.warmup()
    layer8.warmup()
    timer = bench._Timer(True, 3, 10)
    print(f"{'T':>6} {'fp8 ms':>8} {'floor8':>8} {'x floor':>7} {'bf16 ms':>8} {'bf16/fp8':>8} "
          f"{'err ref':>8} {'err unq':>8}", flush=True)
    for T in tokens:
        n_sets = int(min(8, max(2, (128 << 20) // (T * cfg.hidden_size * 2))))
        xs = [bench._normal(cp, (T, cfg.hidden_size), BF16, 100 + i) for i in range(n_sets)]
        r = layer8.route(xs[0])
        ids = r.topk_ids.get()
        floor, _, _ = bench.floor_time(layer8.config, ids, bandwidth, rate8)
        ms8 = timer(layer8, xs)
        ms16 = timer(layer, xs)
        err, err_unq = _sampled_errors(layer, layer8, xs[0], r, samples=2 if T in (1, 128) else 0)
        print(f"{T:>6} {ms8:>8.3f} {floor * 1e3:>8.3f} {ms8 / floor / 1e3:>7.2f} {ms16:>8.3f} "
              f"{ms16 / ms8:>8.2f} {err:>8.2e} {err_unq:>8.2e}  (cuBLASLt: "
              f"{fp8_path.LT_REFUSAL or fp8_path.LT_REFUSED or 'used'})", flush=True)
        for strategy in {128: ("grouped", "padded"), 1024: ("grouped", "padded"),
                         16384: ("padded",)}.get(T, ()):
            layer8.expert_strategy = strategy
            ms = timer(layer8, xs)
            layer8.expert_strategy = "auto"
            print(f"    strategy {strategy}: {ms:.3f} ms ({ms / floor / 1e3:.2f}x floor)",
                  flush=True)
        del xs
        cp.get_default_memory_pool().free_all_blocks()


def compare(tokens):
    """A short run for kernel work: per T, fp8 "auto" and the other fp8 kernels that could
    serve it, the fp8 floor (copy rate measured here; the FLOP term at an assumed 1.3 PFLOP/s
    fp8 rate, never the larger one up to 16384 tokens), our bf16 layer, the graphed fp8 layer
    at small T, and each alternative's relative difference from "auto" (same FP8 math)."""
    import zeromoe_cupy as zm
    from zeromoe_cupy.experts import fp8 as fp8_path
    fp8_path.LT_INEXACT_SUMS = True  # "padded" through cuBLASLt (inexact sums on 9.x)
    cfg = zm.MoEConfig.preset("longcat-flash")
    t0 = time.time()
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
    bench.calibrate_zero_bias(layer, 8.0)
    layer8 = layer.quantize("fp8")
    bandwidth = bench.measure_copy(True)["best"]
    layer.warmup()
    layer8.warmup()
    cp.cuda.runtime.deviceSynchronize()
    print(f"built in {time.time() - t0:.1f} s; copy {bandwidth / 1e12:.2f} TB/s", flush=True)
    timer = bench._Timer(True, 2, 7)
    small = [t for t in tokens if t <= 16]
    graphed = layer8.graphed(max(small), capture_sizes=small) if small else None

    def run(strategy, mma, xs):
        layer8.expert_strategy, fp8_path.GROUPED_MMA = strategy, mma
        try:
            return timer(layer8, xs), layer8(xs[0]).get().astype(np.float32)
        finally:
            layer8.expert_strategy, fp8_path.GROUPED_MMA = "auto", True

    for T in tokens:
        n_sets = int(min(4, max(2, (128 << 20) // (T * cfg.hidden_size * 2))))
        xs = [bench._normal(cp, (T, cfg.hidden_size), BF16, 100 + i) for i in range(n_sets)]
        floor, _, _ = bench.floor_time(layer8.config, layer8.route(xs[0]).topk_ids.get(),
                                       bandwidth, 1.3e15)
        ms16 = timer(layer, xs)
        ms8, y8 = run("auto", True, xs)
        line = f"T={T:>5} fp8 auto {ms8:.3f} ms ({ms8 / floor / 1e3:.2f}x floor " \
               f"{floor * 1e3:.3f}) bf16 {ms16:.3f} ({ms16 / ms8:.2f}x)"
        if graphed is not None and T in small:
            msg = timer(graphed, xs)
            line += f" graphed {msg:.3f} ({msg / floor / 1e3:.2f}x)"
        print(line, flush=True)
        alts = [("pairs", True), ("grouped", True)] if T <= 26 else \
            [("grouped", True), ("grouped", False), ("padded", True)] if T <= 4096 else \
            [("grouped", True), ("padded", True)]
        for strategy, mma in alts:
            if T > 1024 and not mma:
                continue  # the FMA kernel is far slower there
            ms, y = run(strategy, mma, xs)
            print(f"    {strategy}{'' if mma else ' (fma kernel)'}: {ms:.3f} ms "
                  f"({ms / floor / 1e3:.2f}x floor), diff from auto "
                  f"{relative_error(y, y8):.1e}", flush=True)
        del xs
        cp.get_default_memory_pool().free_all_blocks()


class _Lazy:
    """w[e] fetched to the host on demand (the float64 reference reads a few experts)."""

    def __init__(self, a):
        self.a = a

    def __getitem__(self, e):
        return self.a[int(e)].get()


def _sampled_errors(layer, layer8, x, r, samples=3):
    """(fp8 vs the float64 fp8 evaluation on `samples` tokens, fp8 vs our bf16 layer)."""
    from zeromoe_cupy import reference
    cfg = layer8.config
    y8 = layer8(x, routing=r).get()
    y16 = layer(x, routing=r).get()
    err_unq = relative_error(y8, y16.astype(np.float32))
    if samples == 0:
        return float("nan"), err_unq
    rows = np.linspace(0, x.shape[0] - 1, min(samples, x.shape[0])).astype(int)
    ids, w = r.topk_ids.get()[rows], r.topk_weights.get()[rows]
    xh = x.get()[rows]
    ref8, _ = reference.forward(xh, None, _Lazy(layer8.w13), _Lazy(layer8.w2), top_k=cfg.top_k,
                                num_experts=cfg.num_experts, zero_expert_type=cfg.zero_types,
                                routing=(ids, w), w13_scale_inv=_Lazy(layer8.w13_scale_inv),
                                w2_scale_inv=_Lazy(layer8.w2_scale_inv))
    return relative_error(y8[rows], ref8), err_unq


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["probe", "timing", "compare"])
    parser.add_argument("tokens", nargs="?", type=bench.token_list,
                        help="comma-separated token counts (timing: default 1,16,128,1024,16384)")
    args = parser.parse_args()
    if args.mode == "probe":
        probe()
    elif args.mode == "compare":
        if args.tokens is None:
            parser.error("compare needs token counts")
        compare(args.tokens)
    else:
        timing(args.tokens or [1, 16, 128, 1024, 16384])
