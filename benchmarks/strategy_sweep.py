"""Forward time of the LongCat-Flash layer per expert strategy and tile sizes, to set the
"auto" rules in experts/_common.py (PAIRS_MAX, PADDED_MIN_ROWS, PAD_ROWS, MAX_TILE).

usage: python benchmarks/strategy_sweep.py OUT.json
"""
import json
import sys

import cupy as cp
import numpy as np

import zeromoe_cupy as zm
from zeromoe_cupy import experts
from zeromoe_cupy.bench import (_normal, _stage_times, _Timer, calibrate_zero_bias, floor_time,
                                measure_ceilings)

cfg = zm.MoEConfig.preset("longcat-flash")
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
calibrate_zero_bias(layer, 8.0)
ceilings = measure_ceilings(layer.w13.dtype, quick=True)
bw, rate = ceilings["copy"]["best"], ceilings["matmul"]["best"]
timer = _Timer(True, 2, 7)
TILES = [(64, 512), (64, 256), (128, 512), (32, 512)]  # (PAD_ROWS, MAX_TILE)
rows = []
print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: copy {bw / 1e12:.2f} TB/s, "
      f"matmul {rate / 1e12:.0f} TFLOP/s")
for T in (1, 8, 16, 24, 32, 256, 1024, 2048, 4096, 8192, 16384):
    n_sets = int(min(8, max(2, (128 << 20) // (T * cfg.hidden_size * 2))))
    xs = [_normal(cp, (T, cfg.hidden_size), layer.w13.dtype, 100 + i) for i in range(n_sets)]
    ids = layer.route(xs[0]).topk_ids.get()
    floor, _, _ = floor_time(cfg, ids, bw, rate)
    counts = np.bincount(ids[ids < cfg.num_experts].ravel(), minlength=cfg.num_experts)
    row = {"T": T, "floor_ms": floor * 1e3,
           "rows_per_active": float(counts.sum() / max(1, np.count_nonzero(counts)))}
    plans = [("grouped", None)] + [("padded", t) for t in TILES]
    if T <= 32:
        plans.insert(0, ("pairs", None))
    if T < 1024:
        plans = plans[:3]
    for strategy, tiles in plans:
        if tiles:
            experts.grouped.PAD_ROWS, experts.grouped.MAX_TILE = tiles
        layer.expert_strategy = strategy
        key = strategy if tiles is None else f"padded_{tiles[0]}_{tiles[1]}"
        row[key] = timer(layer, xs)
        cp.get_default_memory_pool().free_all_blocks()
    experts.grouped.PAD_ROWS, experts.grouped.MAX_TILE = TILES[0]
    layer.expert_strategy = "auto"
    row["auto"] = timer(layer, xs)
    if T in (1, 16, 4096, 16384):
        row["auto_stages"] = _stage_times(layer, xs, timer)
    rows.append(row)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else
                   f"{k}={ {a: round(b, 3) for a, b in v.items()} }" if isinstance(v, dict) else
                   f"{k}={v}" for k, v in row.items()), flush=True)
with open(sys.argv[1], "w") as f:
    json.dump({"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "rows": rows}, f,
              indent=1)
