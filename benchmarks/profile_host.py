"""Where the host time of small eager forwards goes: cProfile over many calls on the GPU.

For each token count: the device-side median (cupyx.profiler.benchmark: its CPU column is the
host time of a call), then cProfile's functions by their own time over `--calls` calls."""
import argparse
import cProfile
import pstats

import cupy as cp
from cupyx.profiler import benchmark

import zeromoe_cupy as zm
from zeromoe_cupy.bench import token_list

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--preset", default="longcat-flash")
parser.add_argument("--quantization", choices=["fp8"], default=None)
parser.add_argument("--tokens", type=token_list, default=[1], help="comma-separated (default 1)")
parser.add_argument("--calls", type=int, default=200)
parser.add_argument("--top", type=int, default=25, help="functions listed per token count")
args = parser.parse_args()

cfg = zm.MoEConfig.preset(args.preset)
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
if args.quantization:
    layer = layer.quantize(args.quantization)
layer.warmup()
for T in args.tokens:
    x = cp.random.default_rng(T).standard_normal((T, cfg.hidden_size), dtype=cp.float32).astype(
        cfg.dtype)
    print(f"== T={T} {args.quantization or cfg.dtype}")
    print(benchmark(layer.__call__, (x,), n_repeat=100, n_warmup=10))
    r = layer.route(x)
    print(benchmark(layer.route, (x,), n_repeat=100, n_warmup=10))
    print(benchmark(layer.__call__, (x,), kwargs=dict(routing=r), n_repeat=100, n_warmup=10,
                    name="layer(x, routing=r)"))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        layer(x)
    cp.cuda.Device().synchronize()
    prof.disable()
    print(f"cProfile, {args.calls} calls (per call: divide by {args.calls}):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
