"""The fp8 layer's grouped GEMMs on wgmma (grouped_wgmma_fp8) against the kernels before it
(grouped_mma_fp8 / the padded cuBLASLt path) and the bf16 layer, for several of its pipelines: LongCat-Flash (8 of 12 slots
real), eager forward ms, x the fp8 floor, measured interleaved in one run; and the largest
relative difference between the two fp8 outputs.

    python benchmarks/fp8_prefill.py [tokens,comma,separated]
"""
import sys

import cupy as cp

import zeromoe_cupy as zm
from zeromoe_cupy import bench
from zeromoe_cupy._arrays import np_dtype
from zeromoe_cupy.experts import fp8 as fp8_path
from zeromoe_cupy.reference import relative_error

# the padded path through cuBLASLt, as before (its sums are inexact on compute capability 9.x,
# so the package leaves it off there: experts/fp8.py LT_INEXACT_SUMS)
fp8_path.LT_INEXACT_SUMS = True
sizes = [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else
                          "256,512,1024,2048,4096,16384").split(",")]
cfg = zm.MoEConfig.preset("longcat-flash")
dt = np_dtype(cfg.dtype)
bf16 = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
bench.calibrate_zero_bias(bf16, 8.0)
fp8 = bf16.quantize("fp8")
ceilings = bench.measure_ceilings(cfg.dtype, quick=True)
bandwidth = ceilings["copy"]["best"]
rate = bench.measure_matmul("float8_e4m3fn", True)["best"]
print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: copy "
      f"{bandwidth / 1e12:.2f} TB/s, fp8 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
timer = bench._Timer(True, 2, 5)
# grouped_wgmma_fp8's pipelines: (warpgroups per block that multiply, stages, work order, k's
# per promoted partial sum of the gate/up GEMM, producer warpgroup), quant.py
PIPELINES = [(1, 4, 0, 32, 0), (1, 4, 0, 32, 1), (2, 4, 0, 32, 1), (1, 4, 0, 64, 1),
             (1, 4, 0, 128, 1), (2, 4, 0, 128, 1)]
KEYS = ("WG_GROUPS", "WG_STAGES", "WG_ORDER", "WG_PROMOTE", "WG_PRODUCER")
ways = {"wgmma" + "-".join(map(str, p)): dict(
    GROUPED_WGMMA=True, WGMMA_PAIRS_PER_EXPERT=0, WGMMA_PIPELINE=tuple(zip(KEYS, p)))
    for p in PIPELINES}
ways["before"] = dict(GROUPED_WGMMA=False)


def use(way):
    for name, value in ways[way].items():
        setattr(fp8_path, name, value)


for T in sizes:
    n = int(min(8, max(2, (128 << 20) // (T * cfg.hidden_size * 2))))
    xs = [bench._normal(cp, (T, cfg.hidden_size), dt, 100 + i) for i in range(n)]
    ids = fp8.route(xs[0]).topk_ids
    floor = bench.floor_time(fp8.config, ids.get(), bandwidth, rate)[0] * 1e3
    ys = {}
    for way in ways:
        use(way)
        ys[way] = fp8(xs[0]).astype(cp.float32).get()
    best = {}
    for _ in range(2):  # interleaved, best of two
        for way in ways:
            use(way)
            ms = timer(fp8, xs)
            best[way] = min(best.get(way, ms), ms)
        ms = timer(bf16, xs)
        best["bf16"] = min(best.get("bf16", ms), ms)
    top = min((w for w in ways if w.startswith("wgmma")), key=best.get)
    print(f"T={T} floor {floor:.3f} ms: " +
          ", ".join(f"{k} {v:.3f} ({v / floor:.2f}x)" for k, v in best.items()) +
          f"; bf16 / {top} {best['bf16'] / best[top]:.2f}; relative difference to before: " +
          ", ".join(f"{w} {relative_error(ys[w], ys['before']):.1e}" for w in ways
                    if w != "before"), flush=True)
