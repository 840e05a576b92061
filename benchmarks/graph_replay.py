"""Eager forward vs replayed CUDA graphs vs the floor, LongCat-Flash (8 of 12 slots real).

Columns: the eager layer ("auto"), the graph as graphed() builds it (programmatic dependent
launch between its kernels on sm_90 and later), the same graph captured with plain launches
(graphs.PROGRAMMATIC_LAUNCH = False), each as x the floor of the same run; replay vs eager
agreement; then the host time of T=1 calls (where an eager call spends it: profile_host.py).
Usage: graph_replay.py [--tokens 1,4,16] [--quantization fp8] [--json out.json]
"""
import argparse
import json
import time

import cupy as cp
import numpy as np

import zeromoe_cupy as zm
from zeromoe_cupy import graphs
from zeromoe_cupy._arrays import np_dtype
from zeromoe_cupy.bench import (_normal, _Timer, calibrate_zero_bias, floor_time,
                                measure_ceilings, measure_matmul)
from zeromoe_cupy.reference import relative_error

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", default="1,4,16,32,64,128,256,512,1024",
                    help="comma-separated token counts (default: %(default)s)")
parser.add_argument("--quantization", choices=["fp8"], default=None,
                    help="block-scaled FP8 experts (floor from their e4m3 bytes)")
parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
args = parser.parse_args()
tokens = [int(t) for t in args.tokens.split(",")]
cfg = zm.MoEConfig.preset("longcat-flash")
dt = np_dtype(cfg.dtype)
t0 = time.perf_counter()
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
offset, share = calibrate_zero_bias(layer, 8.0)
ceilings = measure_ceilings(cfg.dtype, quick=True)
bandwidth, rate = ceilings["copy"]["best"], ceilings["matmul"]["best"]
if args.quantization:  # the zero experts' offset and the router are copied unquantized
    layer = layer.quantize(args.quantization)
    rate = measure_matmul("float8_e4m3fn", True)["best"]
layer.warmup()
print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: built in "
      f"{time.perf_counter() - t0:.1f} s, {share:.2f} real slots, copy "
      f"{bandwidth / 1e12:.2f} TB/s, matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
t0 = time.perf_counter()
g = layer.graphed(capture_sizes=tokens)
t1 = time.perf_counter()
graphs.PROGRAMMATIC_LAUNCH = False
try:
    g_plain = layer.graphed(capture_sizes=tokens)
finally:
    graphs.PROGRAMMATIC_LAUNCH = True
print(f"captured {len(tokens)} sizes in {t1 - t0:.2f} s (plain launches: "
      f"{time.perf_counter() - t1:.2f} s)", flush=True)
timer = _Timer(True, 3, 20)
rows = []
print(f"{'T':>5} {'floor':>7} {'eager':>7} {'x':>5} {'replay':>7} {'x':>5} {'plain':>7} "
      f"{'x':>5} {'err':>8}")
for T in tokens:
    n_sets = int(min(16, max(2, (128 << 20) // (T * cfg.hidden_size * 2))))
    xs = [_normal(cp, (T, cfg.hidden_size), dt, 100 + i) for i in range(n_sets)]
    ids = layer.route(xs[0]).topk_ids.get()
    floor = floor_time(layer.config, ids, bandwidth, rate)[0] * 1e3
    row = {"tokens": T, "floor_ms": floor, "eager_ms": timer(layer, xs),
           "replay_ms": timer(g, xs), "replay_plain_ms": timer(g_plain, xs)}
    ref = layer(xs[0]).get().astype(np.float32)
    row["replay_vs_eager_rel_err"] = relative_error(g(xs[0]).get().astype(np.float32), ref)
    row["replay_vs_plain_equal"] = bool((g(xs[0]) == g_plain(xs[0])).all())
    rows.append(row)
    print(f"{T:>5} {floor:>7.3f} {row['eager_ms']:>7.3f} {row['eager_ms'] / floor:>5.2f} "
          f"{row['replay_ms']:>7.3f} {row['replay_ms'] / floor:>5.2f} "
          f"{row['replay_plain_ms']:>7.3f} {row['replay_plain_ms'] / floor:>5.2f} "
          f"{row['replay_vs_eager_rel_err']:>8.1e}"
          f"{'' if row['replay_vs_plain_equal'] else '  replay != plain replay'}", flush=True)
if args.json:
    with open(args.json, "w") as f:
        json.dump({"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                   "quantization": args.quantization,
                   "copy_bandwidth_Bps": bandwidth, "matmul_flops": rate,
                   "real_slots": share, "rows": rows}, f, indent=1)
# Host time of T=1 calls (the GPU runs ahead: this is what a call costs the host).
x = xs[0][:1].copy()
for fn, name in ((layer, "eager"), (g, "replay")):
    fn(x)
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        fn(x)
    host = (time.perf_counter() - t0) / 50 * 1e3
    cp.cuda.Device().synchronize()
    print(f"T=1 {name}: {host:.3f} ms host time per call (50 calls queued)")
