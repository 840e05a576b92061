"""Graph replay of the LongCat-Flash layer (8 of 12 slots real) with the stream kernels built
for several STREAM_DEPTH values (kernels/async_mma.cuh: 64-byte steps of weight loads in
flight per lane): syncfree_stream (bf16 graphs from 11 tokens), pair_mma_fp8 and
grouped_stream_fp8 (fp8 graphs). Times are medians of CUDA-event timings after warm-up, x the
floor measured in the same run; every depth's output is compared bit for bit with the first
depth's (the depth moves loads, not arithmetic).
Usage: stream_depth.py [--depths 1,2,4] [--tokens 16,64] [--quantization fp8] [--json out.json]
"""
import argparse
import json
import time

import cupy as cp
import numpy as np

import zeromoe_cupy as zm
from zeromoe_cupy import quant
from zeromoe_cupy._arrays import np_dtype
from zeromoe_cupy.bench import (_normal, _Timer, calibrate_zero_bias, floor_time,
                                measure_ceilings, measure_matmul)
from zeromoe_cupy.experts import syncfree

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--depths", default="2,4,6", help="STREAM_DEPTH values (default: %(default)s)")
parser.add_argument("--tokens", default="1,4,16,32,64,128",
                    help="comma-separated token counts (default: %(default)s)")
parser.add_argument("--quantization", choices=["fp8"], default=None)
parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
args = parser.parse_args()
depths = [int(d) for d in args.depths.split(",")]
tokens = [int(t) for t in args.tokens.split(",")]
cfg = zm.MoEConfig.preset("longcat-flash")
dt = np_dtype(cfg.dtype)
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
offset, share = calibrate_zero_bias(layer, 8.0)
ceilings = measure_ceilings(cfg.dtype, quick=True)
bandwidth, rate = ceilings["copy"]["best"], ceilings["matmul"]["best"]
if args.quantization:
    layer = layer.quantize(args.quantization)
    rate = measure_matmul("float8_e4m3fn", True)["best"]
print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: copy "
      f"{bandwidth / 1e12:.2f} TB/s, {share:.2f} real slots", flush=True)
base_sf, base_fp8 = syncfree.device_pipeline(), quant.fp8_pipeline()
timer = _Timer(True, 3, 20)
inputs = {T: [_normal(cp, (T, cfg.hidden_size), dt, 100 + i) for i in range(4)] for T in tokens}
floors = {T: floor_time(layer.config, layer.route(inputs[T][0]).topk_ids.get(), bandwidth,
                        rate)[0] * 1e3 for T in tokens}
rows = {T: {"tokens": T, "floor_ms": floors[T]} for T in tokens}
first = {}
for d in depths:
    syncfree.device_pipeline = lambda d=d: base_sf + (("STREAM_DEPTH", d),)
    quant.fp8_pipeline = lambda d=d: base_fp8 + (("STREAM_DEPTH", d),)
    t0 = time.perf_counter()
    g = layer.graphed(capture_sizes=tokens)
    print(f"depth {d}: captured in {time.perf_counter() - t0:.1f} s", flush=True)
    for T in tokens:
        rows[T][f"depth{d}_ms"] = timer(g, inputs[T])
        y = g(inputs[T][0])
        if T not in first:
            first[T] = y
        rows[T][f"depth{d}_equal"] = bool((y == first[T]).all())
    del g
print(f"{'T':>5} {'floor':>7} " + " ".join(f"{'d' + str(d):>7} {'x':>5}" for d in depths))
for T in tokens:
    r = rows[T]
    print(f"{T:>5} {r['floor_ms']:>7.3f} " + " ".join(
        f"{r[f'depth{d}_ms']:>7.3f} {r[f'depth{d}_ms'] / r['floor_ms']:>5.2f}"
        + ("" if r[f"depth{d}_equal"] else "!") for d in depths))
print("(! after a ratio: that depth's output differs from the first depth's)")
if args.json:
    with open(args.json, "w") as f:
        json.dump({"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                   "quantization": args.quantization, "copy_bandwidth_Bps": bandwidth,
                   "matmul_flops": rate, "real_slots": share, "rows": list(rows.values())},
                  f, indent=1)
