"""Eager forward vs replayed CUDA graphs vs the floor, LongCat-Flash bf16 (8 of 12 slots real).

Columns: the eager layer ("auto"), the eager layer with expert_strategy="syncfree", the graph
as graphed() builds it (pairs up to PAIRS_MAX pairs, syncfree above) and a graph that runs
syncfree at every size; replay vs eager agreement; then where an eager T=1 call spends its
host time (cProfile). Usage: graph_replay.py [tokens,comma,separated] [out.json]
"""
import cProfile
import json
import pstats
import sys
import time

import cupy as cp
import numpy as np

import zeromoe_cupy as zm
from zeromoe_cupy._arrays import np_dtype
from zeromoe_cupy.bench import _normal, _Timer, calibrate_zero_bias, floor_time, measure_ceilings
from zeromoe_cupy.reference import relative_error

tokens = [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else
                           "1,4,16,32,64,128,256,512,1024").split(",")]
out = sys.argv[2] if len(sys.argv) > 2 else None
cfg = zm.MoEConfig.preset("longcat-flash")
dt = np_dtype(cfg.dtype)
t0 = time.perf_counter()
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
offset, share = calibrate_zero_bias(layer, 8.0)
ceilings = measure_ceilings(cfg.dtype, quick=True)
bandwidth, rate = ceilings["copy"]["best"], ceilings["matmul"]["best"]
layer.warmup()
print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: built in "
      f"{time.perf_counter() - t0:.1f} s, {share:.2f} real slots, copy "
      f"{bandwidth / 1e12:.2f} TB/s, matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
t0 = time.perf_counter()
g = layer.graphed(capture_sizes=tokens)
t1 = time.perf_counter()
layer.expert_strategy = "syncfree"
g_sf = layer.graphed(capture_sizes=tokens)
layer.expert_strategy = "auto"
print(f"captured {len(tokens)} sizes in {t1 - t0:.2f} s (syncfree-only: "
      f"{time.perf_counter() - t1:.2f} s)", flush=True)
timer = _Timer(True, 3, 20)
rows = []
print(f"{'T':>5} {'floor':>7} {'eager':>7} {'x':>5} {'eager_sf':>8} {'x':>5} {'replay':>7} "
      f"{'x':>5} {'rep_sf':>7} {'x':>5} {'err':>8}")
for T in tokens:
    n_sets = int(min(16, max(2, (128 << 20) // (T * cfg.hidden_size * 2))))
    xs = [_normal(cp, (T, cfg.hidden_size), dt, 100 + i) for i in range(n_sets)]
    ids = layer.route(xs[0]).topk_ids.get()
    floor = floor_time(cfg, ids, bandwidth, rate)[0] * 1e3
    row = {"tokens": T, "floor_ms": floor, "eager_ms": timer(layer, xs)}
    layer.expert_strategy = "syncfree"
    row["eager_syncfree_ms"] = timer(layer, xs)
    layer.expert_strategy = "auto"
    row["replay_ms"] = timer(g, xs)
    row["replay_syncfree_ms"] = timer(g_sf, xs)
    ref = layer(xs[0]).get().astype(np.float32)
    row["replay_vs_eager_rel_err"] = relative_error(g(xs[0]).get().astype(np.float32), ref)
    row["replay_sf_vs_eager_rel_err"] = relative_error(g_sf(xs[0]).get().astype(np.float32),
                                                       ref)
    rows.append(row)
    print(f"{T:>5} {floor:>7.3f} {row['eager_ms']:>7.3f} {row['eager_ms'] / floor:>5.2f} "
          f"{row['eager_syncfree_ms']:>8.3f} {row['eager_syncfree_ms'] / floor:>5.2f} "
          f"{row['replay_ms']:>7.3f} {row['replay_ms'] / floor:>5.2f} "
          f"{row['replay_syncfree_ms']:>7.3f} {row['replay_syncfree_ms'] / floor:>5.2f} "
          f"{row['replay_vs_eager_rel_err']:>8.1e}", flush=True)
if out:
    with open(out, "w") as f:
        json.dump({"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                   "copy_bandwidth_Bps": bandwidth, "matmul_flops": rate,
                   "real_slots": share, "rows": rows}, f, indent=1)
# Host time of eager T=1 calls (the GPU runs ahead: this is what a call costs the host).
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
prof = cProfile.Profile()
prof.enable()
for _ in range(200):
    layer(x)
cp.cuda.Device().synchronize()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
