"""Where a replayed graph's time goes: the kernel timeline of graph replays (CUPTI through
torch.profiler, which records every kernel of the process, CuPy's included), LongCat-Flash,
8 of 12 slots real, bf16 or block-scaled FP8 experts. Per size: the floor, the replay's span
(first kernel start to last kernel end, median over replays), each kernel's median duration,
and the idle time between kernels. Needs torch (profiler only).
Usage: graph_profile.py [--tokens 1,4,16] [--quantization fp8] [--plain] [--json out.json]
"""
import argparse
import json
import os
import tempfile
from collections import defaultdict

import cupy as cp
import numpy as np

import zeromoe_cupy as zm
from zeromoe_cupy import graphs
from zeromoe_cupy._arrays import np_dtype
from zeromoe_cupy.bench import (_normal, calibrate_zero_bias, floor_time, measure_ceilings,
                                measure_matmul)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", default="1,4,16,64,128,256,1024",
                    help="comma-separated token counts (default: %(default)s)")
parser.add_argument("--quantization", choices=["fp8"], default=None,
                    help="block-scaled FP8 experts (floor from their e4m3 bytes)")
parser.add_argument("--plain", action="store_true",
                    help="capture with plain launches (graphs.PROGRAMMATIC_LAUNCH = False): with "
                         "programmatic ones a kernel starts before the one it waits for ends, "
                         "and its duration includes the wait")
parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
args = parser.parse_args()
tokens = [int(t) for t in args.tokens.split(",")]
import torch  # noqa: E402  (after the arguments: --help works without it)
out = args.json
REPLAYS = 12
cfg = zm.MoEConfig.preset("longcat-flash")
dt = np_dtype(cfg.dtype)
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
calibrate_zero_bias(layer, 8.0)
ceilings = measure_ceilings(cfg.dtype, quick=True)
bandwidth, rate = ceilings["copy"]["best"], ceilings["matmul"]["best"]
if args.quantization:  # the zero experts' offset and the router are copied unquantized
    layer = layer.quantize(args.quantization)
    rate = measure_matmul("float8_e4m3fn", True)["best"]
layer.warmup()
graphs.PROGRAMMATIC_LAUNCH = not args.plain
g = layer.graphed(capture_sizes=tokens)
torch.cuda.init()
results = []
for T in tokens:
    xs = [_normal(cp, (T, cfg.hidden_size), dt, 100 + i) for i in range(REPLAYS)]
    for x in xs[:3]:
        g(x)
    cp.cuda.Device().synchronize()
    floor = floor_time(layer.config, layer.route(xs[0]).topk_ids.get(), bandwidth, rate)[0] * 1e3
    replays = []
    for x in xs:  # one replay per profiler session: its kernels are that replay's
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            g(x)
            cp.cuda.Device().synchronize()
        path = os.path.join(tempfile.mkdtemp(), "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
        replays.append(sorted((e for e in events
                               if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                              key=lambda e: e["ts"]))
    spans, gaps, per_kernel = [], [], defaultdict(list)
    for r in replays:
        spans.append((r[-1]["ts"] + r[-1]["dur"] - r[0]["ts"]) / 1e3)
        gaps.append(sum(max(0, b["ts"] - (a["ts"] + a["dur"])) for a, b in zip(r, r[1:])) / 1e3)
        for i, e in enumerate(r):
            per_kernel[f"{i:02d} {e['name'][:60]}"].append(e["dur"] / 1e3)
    span = float(np.median(spans))
    row = {"tokens": T, "floor_ms": floor, "replays": len(replays), "span_ms": span,
           "gap_ms": float(np.median(gaps)),
           "kernels_ms": {k: float(np.median(v)) for k, v in sorted(per_kernel.items())}}
    results.append(row)
    print(f"T={T}: floor {floor:.4f} ms, replay span {span:.4f} ms ({span / floor:.3f}x), "
          f"idle between kernels {row['gap_ms']:.4f} ms, {len(replays)} replays of "
          f"{sorted(len(r) for r in replays)} kernels", flush=True)
    for k, v in row["kernels_ms"].items():
        print(f"   {v:8.4f} ms  {k}")
if out:
    with open(out, "w") as f:
        json.dump({"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                   "quantization": args.quantization, "plain_launches": args.plain,
                   "copy_bandwidth_Bps": bandwidth,
                   "matmul_flops": rate, "rows": results},
                  f, indent=1)
