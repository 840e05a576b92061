"""Router GEMM at LongCat shapes (H=6144, N=768, bf16 x): time and error against float64 for
the fp32 GEMM and for bf16x3 with several K-chunk sizes of its leading part."""
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


def error(logits):
    return float(np.abs(logits.get()[rows] - exact).max() / np.abs(exact).max())


res["rows"].append({"method": "fp32", "ms": timer(lambda _: routing.router_logits(x, wr), [0]),
                    "max_rel_err": error(routing.router_logits(x, wr))})
for chunk in (6144, 1536, 768, 512, 256):
    routing.BF16X3_CHUNK = chunk
    fn = lambda _: routing.router_logits(x, wr, weight_parts=parts)  # noqa: E731
    res["rows"].append({"method": f"bf16x3 chunk {chunk}", "ms": timer(fn, [0]),
                        "max_rel_err": error(fn(0))})
for r in res["rows"]:
    print(f"{r['method']:22s} {r['ms']:.3f} ms  max rel err {r['max_rel_err']:.2e}")
json.dump(res, open(sys.argv[1], "w"), indent=1)
