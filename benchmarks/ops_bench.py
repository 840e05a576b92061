"""Stage benchmarks on the GPU: route alone (logits given) against a torch peer, its host
enqueue cost, and the zero-expert / combine passes against the copy bandwidth."""
import json
import sys
import time

import cupy as cp
import numpy as np

from zeromoe_cupy import ops
from zeromoe_cupy.bench import _Timer, measure_copy

timer = _Timer(True, 5, 50)
throughput = _Timer(True, 2, 20, batch=10)
bw = measure_copy(quick=True)["best"]
res = {"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "copy_Bps": bw, "route": [],
       "zero": {}}
print(f"{res['gpu']}: copy {bw / 1e12:.2f} TB/s")
N, K, E = 768, 12, 512
bias = cp.zeros(N, cp.float32)
bias[E:] = 0.01
try:
    import torch
except ImportError:
    torch = None
for T in (1, 128, 4096, 65536):
    logits = [cp.random.default_rng(i).standard_normal((T, N), dtype=cp.float32) for i in range(4)]
    def ours_fn(L):
        return ops.route(L, K, e_score_correction_bias=bias, routed_scaling_factor=6.0)
    ours = timer(ours_fn, logits)  # one call at a time: host enqueue included
    ours_back_to_back = throughput(ours_fn, logits)  # the GPU time per call
    # bw counts the bytes a copy reads plus those it writes: reading the logits once takes
    # their size over bw.
    # The kernel alone, arguments made once (no allocation, memset or checks per call), with
    # this bias and with a zero bias (which ncu runs used).
    from zeromoe_cupy import routing
    kern, max_blocks = routing._route_function(False, N)

    def kernel_alone(b):
        prebuilt = []
        routing.launch_route_kernel(
            kern, logits[0], b, cp.empty((T, K), np.int32), cp.empty((T, K), np.float32),
            cp.zeros(N, np.int32), K, "softmax", False, 6.0, None, None,
            lambda k, g, bl, a, sh: prebuilt.append((g, bl, a, sh)), max_blocks)
        g, bl, a, sh = prebuilt[0]
        return throughput(lambda _: kern(g, bl, a, shared_mem=sh), [0])
    kernel_only = kernel_alone(bias)
    kernel_only_zero_bias = kernel_alone(cp.zeros(N, cp.float32))
    row = {"T": T, "ours_ms": ours, "ours_back_to_back_ms": ours_back_to_back,
           "kernel_only_back_to_back_ms": kernel_only,
           "kernel_only_zero_bias_ms": kernel_only_zero_bias,
           "read_logits_ms": T * N * 4 / bw * 1e3}
    row["back_to_back_over_read"] = ours_back_to_back / row["read_logits_ms"]
    if torch is not None:
        tb = torch.from_dlpack(bias)

        def peer(L):
            L = torch.from_dlpack(L)
            p = torch.softmax(L, -1)
            ids = torch.topk(p + tb, K, -1)[1]
            return ids, p.gather(1, ids) * 6.0
        row["torch_ms"] = timer(peer, logits)
    res["route"].append(row)
    print(row)
# Host enqueue cost at T=1: many calls timed with a host clock, a sync after each batch of
# 1000; the median of 7 batches.
L1 = cp.random.default_rng(9).standard_normal((1, N), dtype=cp.float32)
for _ in range(100):
    ops.route(L1, K, e_score_correction_bias=bias)
batches = []
for _ in range(7):
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(1000):
        ops.route(L1, K, e_score_correction_bias=bias)
    batches.append((time.perf_counter() - t0) / 1000 * 1e6)
cp.cuda.Device().synchronize()
res["route_host_us_per_call"] = float(np.median(batches))
res["route_host_us_batches"] = batches
print(f"route host enqueue: {res['route_host_us_per_call']:.1f} us/call "
      f"(batches {min(batches):.1f}-{max(batches):.1f})")


def host_us(fn, n=2000):
    for _ in range(50):
        fn()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    cp.cuda.Device().synchronize()
    return us


# Where the route call's host time goes.
from zeromoe_cupy import routing
kern, max_blocks = routing._route_function(False, N)
ids_, w_, c_ = (cp.empty((1, K), np.int32), cp.empty((1, K), np.float32),
                cp.empty(N, np.int32))
stream = cp.cuda.get_current_stream()
parts = {
    "three_empty": lambda: (cp.empty((1, K), np.int32), cp.empty((1, K), np.float32),
                            cp.empty(N, np.int32)),
    "one_empty_three_views": lambda: (lambda o: (o[:K].reshape(1, K),
                                                 o[K:2 * K].view(np.float32).reshape(1, K),
                                                 o[2 * K:]))(cp.empty(2 * K + N, np.int32)),
    "memset": lambda: cp.cuda.runtime.memsetAsync(c_.data.ptr, 0, c_.nbytes, stream.ptr),
    "launch_only": lambda: routing.launch_route_kernel(
        kern, L1, bias, ids_, w_, c_, K, "softmax", False, 1.0, None, None,
        lambda k, g, b, a, sh: k(g, b, a, sh), max_blocks),
    "kernel_call_prebuilt": (lambda a=None: None),
}
args_prebuilt = []
routing.launch_route_kernel(kern, L1, bias, ids_, w_, c_, K, "softmax", False, 1.0, None, None,
                            lambda k, g, b, a, sh: args_prebuilt.append((g, b, a, sh)),
                            max_blocks)
g_, b_, a_, sh_ = args_prebuilt[0]
parts["kernel_call_prebuilt"] = lambda: kern(g_, b_, a_, shared_mem=sh_)
res["route_host_parts_us"] = {k: host_us(f) for k, f in parts.items()}
print("route host parts (us):", {k: round(v, 1) for k, v in res["route_host_parts_us"].items()})
# Zero experts (identity) and combine at T=16384, H=6144, K=12, bf16, 8 real slots.
T, H = 16384, 6144
import ml_dtypes
x = cp.random.default_rng(1).standard_normal((T, H), dtype=cp.float32).astype(ml_dtypes.bfloat16)
rng = np.random.default_rng(2)
ids_h = np.concatenate([rng.integers(0, E, (T, 8)), rng.integers(E, N, (T, 4))], 1)
ids = cp.asarray(ids_h.astype(np.int32))
w = cp.asarray(rng.random((T, K)).astype(np.float32))
nbytes = 2 * T * H * 2 + T * K * 8
for check in (True, False):
    def zero_share(_):
        return ops.zero_expert_output(x, ids, w, E, "identity", num_zero_experts=256,
                                      check_ids=check)
    tag = "identity" if check else "identity_unchecked"
    for kind, t in (("latency", timer), ("throughput", throughput)):
        ms = t(zero_share, [0])
        res["zero"][f"{tag}_{kind}_ms"] = ms
        res["zero"][f"{tag}_{kind}_frac_of_copy"] = nbytes / (ms * 1e-3) / bw
M = T * 8
rows = cp.random.default_rng(3).standard_normal((M, H), dtype=cp.float32).astype(ml_dtypes.bfloat16)
slot = cp.asarray(np.concatenate([np.arange(M).reshape(T, 8), -np.ones((T, 4), int)], 1)
                  .astype(np.int32))
nbytes = (2 * T * H + M * H) * 2 + T * K * 12
for kind, t in (("latency", timer), ("throughput", throughput)):
    ms = t(lambda _: ops.combine(x, ids, w, E, "identity", ops.ExpertOutput(rows, slot),
                                 num_zero_experts=256, check_ids=False), [0])
    res["zero"][f"combine_{kind}_ms"] = ms
    res["zero"][f"combine_{kind}_frac_of_copy"] = nbytes / (ms * 1e-3) / bw
for k, v in res["zero"].items():
    print(f"{k:45s} {v:.3f}")
json.dump(res, open(sys.argv[1] if len(sys.argv) > 1 else "ops_bench.json", "w"), indent=1)
