"""router_gemv (kernels/router.cu) with other warps per row (RG_SPLIT), rows per block (RG_ROWS)
and chunks loaded ahead (RG_UNROLL), LongCat-Flash's router (768 x 6144 fp32, bf16 x), at
few tokens: device time per call, the weight's read rate, and each variant's logits against
the float64 product. The weight is rotated over copies larger than the L2 together, as in
the layer, where the experts' weights evict it between calls.
Usage: router_variants.py [--tokens 1,4,8,16,32] [--json out.json]
"""
import argparse
import json

import cupy as cp
import ml_dtypes
import numpy as np

from zeromoe_cupy import routing
from zeromoe_cupy._compile import NVRTC_OPTIONS, kernel_source

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", default="1,4,8,16,32")
parser.add_argument("--json", metavar="PATH")
args = parser.parse_args()
N, H, MAXT = 768, 6144, routing.ROUTER_GEMV_BLOCK_T
VARIANTS = [(8, 1, 1), (4, 2, 4), (4, 2, 1), (4, 1, 1), (8, 1, 2), (8, 2, 1), (16, 1, 1),
            (16, 1, 2)]  # (split, rows, unroll); the first is the package's
assert VARIANTS[0][:2] == (routing._ROUTER_GEMV_SPLIT, routing._ROUTER_GEMV_ROWS)
COPIES = 8  # 8 x 18.9 MB, past the H200's 50 MB L2
rng = np.random.default_rng(0)
w_host = (rng.standard_normal((N, H)) / np.sqrt(H)).astype(np.float32)
weights = [cp.asarray(w_host) for _ in range(COPIES)]
name = f"router_gemv<__nv_bfloat16,4,{MAXT}>"
rows = []
print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}; us per call (weight read "
      f"rate TB/s), max |logit - float64| / max |logit|")
for T in [int(t) for t in args.tokens.split(",")]:
    x_host = rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16)
    x = cp.asarray(x_host)
    ref = x_host.astype(np.float64) @ w_host.astype(np.float64).T
    line = [f"T={T:>3}"]
    for split, nrows, unroll in VARIANTS:
        mod = cp.RawModule(code=kernel_source("router.cu"), name_expressions=[name],
                           options=NVRTC_OPTIONS + (f"-DRG_SPLIT={split}", f"-DRG_ROWS={nrows}",
                                                    f"-DRG_UNROLL={unroll}"))
        kernel = mod.get_function(name)
        out = cp.empty((T, N), np.float32)
        grid, block = (-(-N // nrows), -(-T // MAXT)), (32 * split * nrows,)

        def call(i):
            kernel(grid, block, (x, np.int64(H), np.int32(T), weights[i % COPIES], np.int32(H),
                                 np.int32(N), np.uint64(0), out))
        for i in range(3 * COPIES):
            call(i)
        times = []
        for rep in range(7):  # 64 calls between two events, 7 times: the median per call
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for i in range(64):
                call(i)
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e3 / 64)
        us = float(np.median(times))
        err = float(np.abs(out.get() - ref).max() / np.abs(ref).max())
        rows.append({"tokens": T, "split": split, "rows": nrows, "unroll": unroll, "us": us,
                     "rel_err": err})
        line.append(f"{split}/{nrows}/{unroll}: {us:6.2f} ({N * H * 4 / us / 1e6:4.2f}) {err:.0e}")
    print("\n       ".join(line), flush=True)
if args.json:
    with open(args.json, "w") as f:
        json.dump({"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "rows": rows},
                  f, indent=1)
