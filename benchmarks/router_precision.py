"""Router GEMM at LongCat shapes (H=6144, N=768, bf16 x): time and error against float64 for
the fp32 GEMM and for bf16x3 with several K-chunk sizes of its leading part, T=16384; then,
for a few tokens, the device time (back-to-back calls) of the matrix-vector kernel, the fp32
GEMM and bf16x3. Usage: router_precision.py [out.json]"""
import json
import sys

import cupy as cp
import ml_dtypes
import numpy as np

from zeromoe_cupy import routing
from zeromoe_cupy.bench import _Timer

H, N, T = 6144, 768, 16384
rng = np.random.default_rng(0)
x = cp.asarray(rng.standard_normal((T, H), dtype=np.float32).astype(ml_dtypes.bfloat16))
wr = cp.asarray((rng.standard_normal((N, H)) * H ** -0.5).astype(np.float32))
rows = np.sort(rng.choice(T, 256, replace=False))
exact = x[rows].get().astype(np.float64) @ wr.get().astype(np.float64).T
parts = routing.split_bf16(wr)
timer = _Timer(True, 3, 20)
res = {"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "T": T, "rows": []}


def error_rows(logits, x32):
    ref = x32.get().astype(np.float64) @ wr.get().astype(np.float64).T
    return float(np.abs(logits.get() - ref).max() / np.abs(ref).max())


def error(logits):
    return float(np.abs(logits.get()[rows] - exact).max() / np.abs(exact).max())


print("few tokens, device ms per call: T, matrix-vector kernel, fp32 GEMM, bf16x3")
res["small"] = []
throughput = _Timer(True, 3, 20, batch=10)
for t in (1, 8, 16, 32, 64, 128, 256):
    xt = x[:t].copy()
    xt32 = xt.astype(np.float32)
    row = {"tokens": t, "gemv_ms": throughput(lambda _: routing._router_gemv(xt, wr, None), [0]),
           "fp32_ms": throughput(lambda _: routing._router_fp32_gemm(xt.astype(np.float32), wr),
                                 [0]),
           "bf16x3_ms": throughput(lambda _: routing._router_bf16x3(xt, parts), [0]),
           "gemv_err": error_rows(routing._router_gemv(xt, wr, None), xt32)}
    res["small"].append(row)
    print(f"{t:6d} {row['gemv_ms']:.4f} {row['fp32_ms']:.4f} {row['bf16x3_ms']:.4f}  "
          f"gemv max rel err {row['gemv_err']:.1e}", flush=True)
res["rows"].append({"method": "fp32", "ms": timer(lambda _: routing.router_logits(x, wr), [0]),
                    "max_rel_err": error(routing.router_logits(x, wr))})
for chunk in (6144, 1536, 768, 512, 256):
    routing.BF16X3_CHUNK = chunk
    fn = lambda _: routing.router_logits(x, wr, weight_parts=parts)  # noqa: E731
    res["rows"].append({"method": f"bf16x3 chunk {chunk}", "ms": timer(fn, [0]),
                        "max_rel_err": error(fn(0))})
for r in res["rows"]:
    print(f"{r['method']:22s} {r['ms']:.3f} ms  max rel err {r['max_rel_err']:.2e}")
if len(sys.argv) > 1:
    json.dump(res, open(sys.argv[1], "w"), indent=1)
