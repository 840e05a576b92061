"""Where the syncfree path (its stream kernel under syncfree.STREAM_PAIRS_PER_EXPERT) and the
capacity path meet, on this card: LongCat-Flash bf16 (8 of 12 slots real), graph replay of
each path and the eager syncfree and padded paths, x the floor, measured interleaved in one
run with 2-16 input sets per size (as graph_replay.py). The two paths' rates differed between
two H200s (benchmarks/NOTES.md), so rerun this before moving the bound.

    python benchmarks/syncfree_vs_capacity.py [tokens,comma,separated]
"""
import sys

import cupy as cp

import zeromoe_cupy as zm
from zeromoe_cupy import bench
from zeromoe_cupy._arrays import np_dtype

sizes = [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else "32,64,128,256,384").split(",")]
cfg = zm.MoEConfig.preset("longcat-flash")
dt = np_dtype(cfg.dtype)
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
bench.calibrate_zero_bias(layer, 8.0)
ceilings = bench.measure_ceilings(cfg.dtype, quick=True)
bandwidth, rate = ceilings["copy"]["best"], ceilings["matmul"]["best"]
layer.warmup()
print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: copy "
      f"{bandwidth / 1e12:.2f} TB/s, matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
graphs = {}
for strategy in ("capacity", "syncfree"):
    layer.expert_strategy = strategy
    graphs[strategy] = layer.graphed(max(sizes), capture_sizes=sizes)
timer = bench._Timer(True, 3, 20)
for T in sizes:
    n = int(min(16, max(2, (128 << 20) // (T * cfg.hidden_size * 2))))
    xs = [bench._normal(cp, (T, cfg.hidden_size), dt, 100 + i) for i in range(n)]
    floor = bench.floor_time(cfg, layer.route(xs[0]).topk_ids.get(), bandwidth, rate)[0] * 1e3
    best = {}
    for _ in range(2):  # interleaved, best of two
        for strategy in ("capacity", "syncfree"):
            ms = timer(graphs[strategy], xs)
            best["graph " + strategy] = min(best.get("graph " + strategy, ms), ms)
        for strategy in ("syncfree", "padded"):
            layer.expert_strategy = strategy
            ms = timer(layer, xs)
            best["eager " + strategy] = min(best.get("eager " + strategy, ms), ms)
    print(f"T={T} ({T * cfg.top_k / cfg.num_experts:.2f} pairs per expert) floor {floor:.3f} ms,"
          f" x floor: " + ", ".join(f"{k} {v / floor:.3f}" for k, v in best.items()), flush=True)
