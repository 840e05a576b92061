"""Where the eager fp8 layer's time goes at prefill sizes: the kernel timeline of forwards
(CUPTI through torch.profiler, which records every kernel of the process, CuPy's included),
LongCat-Flash, 8 of 12 slots real. Per size: the floor, each kernel's summed duration per
forward, and the span. Usage: fp8_profile.py [tokens,comma,separated]. Needs torch.
"""
import json
import os
import sys
import tempfile
from collections import defaultdict

import cupy as cp
import torch

import zeromoe_cupy as zm
from zeromoe_cupy import bench
from zeromoe_cupy._arrays import np_dtype

tokens = [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else "1024,4096,16384").split(",")]
cfg = zm.MoEConfig.preset("longcat-flash")
bf16 = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
bench.calibrate_zero_bias(bf16, 8.0)
fp8 = bf16.quantize("fp8")
del bf16
torch.cuda.init()
RUNS = 3
for T in tokens:
    x = bench._normal(cp, (T, cfg.hidden_size), np_dtype(cfg.dtype), 100)
    fp8(x)
    cp.cuda.Device().synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(RUNS):
            fp8(x)
        cp.cuda.Device().synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"]
                  if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    per = defaultdict(float)
    for e in events:
        per[e["name"][:60]] += e["dur"] / 1e3 / RUNS
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1e3
    print(f"T={T}: kernels {sum(per.values()):.3f} ms per forward, span {span / RUNS:.3f} ms "
          f"per forward ({RUNS} forwards)")
    for name, ms in sorted(per.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {ms:8.3f} ms  {name}")
