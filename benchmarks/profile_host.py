"""Where the host time of one small forward goes: cProfile over many T=1 calls on the GPU."""
import cProfile
import pstats
import sys

import cupy as cp
from cupyx.profiler import benchmark

import zeromoe_cupy as zm

cfg = zm.MoEConfig.preset(sys.argv[1] if len(sys.argv) > 1 else "longcat-flash")
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
x = cp.random.default_rng(0).standard_normal((1, cfg.hidden_size), dtype=cp.float32).astype(
    layer.w13.dtype)
layer.warmup()
r = layer.route(x)
print(benchmark(layer.__call__, (x,), n_repeat=100, n_warmup=10))
print(benchmark(layer.route, (x,), n_repeat=100, n_warmup=10))
out = zm.ops.expert_mlp(x, r.topk_ids, layer.w13, layer.w2, expert_counts=r.expert_counts)
print(benchmark(zm.ops.expert_mlp, (x, r.topk_ids, layer.w13, layer.w2), n_repeat=100,
                n_warmup=10))
prof = cProfile.Profile()
prof.enable()
for _ in range(200):
    layer(x)
cp.cuda.Device().synchronize()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
