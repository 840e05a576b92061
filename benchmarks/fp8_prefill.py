"""The fp8 layer's grouped GEMMs on wgmma (grouped_wgmma_fp8) in its tile shapes and L2 prefetch
hints, and the bf16 layer: LongCat-Flash (8 of 12 slots real), eager forward ms, x the fp8 floor,
measured interleaved in one run; and the largest relative difference of each fp8 output to the
64-row tiles' (m64).

Ways: m64 (64 expert rows per tile as wgmma's M), n32 / n16 (32 / 16 expert rows as wgmma's N,
WGMMA_ROWS_N), each also with a 256-byte L2 prefetch hint on the weight copies
(-p256), and "auto" (what the package picks).

    python benchmarks/fp8_prefill.py [tokens,comma,separated]
"""
import sys

import cupy as cp

import zeromoe_cupy as zm
from zeromoe_cupy import bench
from zeromoe_cupy._arrays import np_dtype
from zeromoe_cupy.experts import fp8 as fp8_path
from zeromoe_cupy.reference import relative_error

sizes = [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else
                          "256,512,1024,2048,4096").split(",")]
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
# grouped_wgmma_fp8's pipeline (quant.py) with the prefetch hint, and its ROWS_N tiles
BASE = fp8_path.WGMMA_PIPELINE
AUTO = {name: getattr(fp8_path, name) for name in ("WGMMA_PIPELINE", "WGMMA_ROWS_N",
                                                   "WGMMA_PAIRS_PER_EXPERT", "GROUPED_WGMMA")}
ways = {}
for prefetch in (128, 256):
    for rows_n in (0, 32, 16):
        name = ("m64" if rows_n == 0 else f"n{rows_n}") + ("-p256" if prefetch == 256 else "")
        ways[name] = dict(GROUPED_WGMMA=True, WGMMA_PAIRS_PER_EXPERT=0,
                          WGMMA_ROWS_N=((1 << 30, rows_n),) if rows_n else (),
                          WGMMA_PIPELINE=BASE + (("WG_PREFETCH", prefetch),))
ways["auto"] = AUTO


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
    top = min((w for w in ways if w != "auto"), key=best.get)
    print(f"T={T} floor {floor:.3f} ms: " +
          ", ".join(f"{k} {v:.3f} ({v / floor:.2f}x)" for k, v in best.items()) +
          f"; bf16 / {top} {best['bf16'] / best[top]:.2f}; relative difference to m64: " +
          ", ".join(f"{w} {relative_error(ys[w], ys['m64']):.1e}" for w in ways
                    if w != "m64"), flush=True)
