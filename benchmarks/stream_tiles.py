"""Graph replay of the LongCat-Flash bf16 layer (8 of 12 slots real) at a few hundred to a
thousand tokens: the "capacity" path (cuBLAS batched GEMMs over blocks of C rows per expert)
against the "syncfree" path with syncfree_gemm (shared-memory pipeline) and
with syncfree_stream at NT 8-row tiles per pass and STREAM_DEPTH steps in flight (variants
"nt:depth"; each builds the kernels with that NT compiled). Medians of CUDA-event timings
after warm-up, x the floor of the same run; each variant's output against the capacity path's
(relative error: different summation orders).
Usage: stream_tiles.py [--tokens 256,1024] [--variants 2:4,4:2] [--json out.json]
"""
import argparse
import json

import cupy as cp
import numpy as np

import zeromoe_cupy as zm
from zeromoe_cupy._arrays import np_dtype
from zeromoe_cupy.bench import _normal, _Timer, calibrate_zero_bias, floor_time, measure_ceilings
from zeromoe_cupy.experts import syncfree
from zeromoe_cupy.reference import relative_error

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", default="192,256,384,512,768,1024")
parser.add_argument("--variants", default="2:4,4:2,4:4,8:2",
                    help="stream kernel variants NT:STREAM_DEPTH (default: %(default)s)")
parser.add_argument("--json", metavar="PATH")
args = parser.parse_args()
tokens = [int(t) for t in args.tokens.split(",")]
variants = [tuple(int(v) for v in s.split(":")) for s in args.variants.split(",")]
cfg = zm.MoEConfig.preset("longcat-flash")
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
offset, share = calibrate_zero_bias(layer, 8.0)
ceilings = measure_ceilings(cfg.dtype, quick=True)
bandwidth, rate = ceilings["copy"]["best"], ceilings["matmul"]["best"]
print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: copy "
      f"{bandwidth / 1e12:.2f} TB/s, {share:.2f} real slots", flush=True)
timer = _Timer(True, 3, 20)
inputs = {T: [_normal(cp, (T, cfg.hidden_size), np_dtype(cfg.dtype), 100 + i) for i in range(3)]
          for T in tokens}
rows = {T: {"tokens": T, "floor_ms": floor_time(layer.config, layer.route(inputs[T][0])
                                                .topk_ids.get(), bandwidth, rate)[0] * 1e3}
        for T in tokens}
base = syncfree.device_pipeline()
names = ["capacity", "gemm"] + [f"{nt}:{d}" for nt, d in variants]
want = {}
for name in names:
    if name == "capacity":
        strategy, pipeline, bound = "capacity", base, syncfree.STREAM_PAIRS_PER_EXPERT
        tiles = syncfree.STREAM_TILES
    elif name == "gemm":
        strategy, pipeline, bound, tiles = "syncfree", base, (), syncfree.STREAM_TILES
    else:
        nt, d = (int(v) for v in name.split(":"))
        strategy, bound, tiles = "syncfree", ((10**9, nt),), (nt,)
        # (a module per variant: the kernel names it compiles are this NT's alone)
        pipeline = base + (("STREAM_DEPTH", d), ("STREAM_TILES_BUILT", nt))
    syncfree.device_pipeline = lambda p=pipeline: p
    syncfree.STREAM_PAIRS_PER_EXPERT, syncfree.STREAM_TILES = bound, tiles
    object.__setattr__(layer, "expert_strategy", strategy)
    g = layer.graphed(capture_sizes=tokens)
    for T in tokens:
        rows[T][name + "_ms"] = timer(g, inputs[T])
        y = g(inputs[T][0]).get().astype(np.float32)
        want.setdefault(T, y)
        rows[T][name + "_vs_capacity"] = relative_error(y, want[T])
    del g
    print(f"{name} done", flush=True)
print(f"{'T':>5} {'floor':>7} " + " ".join(f"{n:>9} {'x':>5}" for n in names))
for T in tokens:
    r = rows[T]
    print(f"{T:>5} {r['floor_ms']:>7.3f} " + " ".join(
        f"{r[n + '_ms']:>9.3f} {r[n + '_ms'] / r['floor_ms']:>5.2f}" for n in names))
print("largest error against the capacity path: " + ", ".join(
    f"{n} {max(rows[T][n + '_vs_capacity'] for T in tokens):.1e}" for n in names[1:]))
if args.json:
    with open(args.json, "w") as f:
        json.dump({"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                   "copy_bandwidth_Bps": bandwidth, "real_slots": share,
                   "rows": list(rows.values())}, f, indent=1)
