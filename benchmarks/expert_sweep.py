"""Weight read rates of the host-sync-free expert kernels at LongCat-Flash shapes (bf16, the
benchmark workload: 8 of 12 slots real), against the copy rate measured in the same run.

- the "syncfree" GEMMs (kernels/syncfree.cu) for each pipeline variant below, T = 64 ... 1024;
- the pair kernel (pair_gemv) for rows per warp 1 ... 8, T = 1 ... 16;
- cuBLAS batched GEMMs over every expert padded to a fixed capacity of C rows (the layout of
  the "capacity" path), C = 8 ... 64; and ("dummy") with only some experts active: over the
  active ones alone, over all, and over all with the inactive entries reading one expert;
- the FP8 layer's eager forward (tensor-core grouped kernel) for stage widths and depths
  of its pipeline (kernels/fp8.cu G8_BK, G8_STAGES), T = 64 ... 1024.
Rate = the distinct experts' weight bytes (SPEC's floor bytes without x and y) / time.
Outputs of every syncfree and pair variant are compared with the default's, slot by slot.

    python benchmarks/expert_sweep.py [out.json] [parts: syncfree,pairs,capacity,dummy,fp8]
"""
import json
import sys
import time

import cupy as cp
import numpy as np

import zeromoe_cupy as zm
from zeromoe_cupy import _cublas
from zeromoe_cupy._arrays import np_dtype
from zeromoe_cupy._compile import raw_module
from zeromoe_cupy.bench import _normal, _Timer, calibrate_zero_bias, measure_ceilings
from zeromoe_cupy.experts import syncfree as sf
from zeromoe_cupy.experts._common import PAIR_WARPS, experts_kernel_names, experts_module

out_path = sys.argv[1] if len(sys.argv) > 1 else None
parts = (sys.argv[2] if len(sys.argv) > 2 else "syncfree,pairs,capacity").split(",")
t_start = time.perf_counter()
cfg = zm.MoEConfig.preset("longcat-flash")
dt = np_dtype(cfg.dtype)
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
calibrate_zero_bias(layer, 8.0)
E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
w13, w2 = layer.w13, layer.w2
copy = measure_ceilings(cfg.dtype, quick=True)["copy"]["best"]
print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: copy {copy / 1e12:.2f} TB/s"
      f" (built in {time.perf_counter() - t_start:.0f} s)", flush=True)
result = {"copy_bytes_per_s": copy, "syncfree": [], "pairs": [], "capacity": [], "fp8": []}


def timed(fn, repeat=15, warmup=3):
    """Median ms of fn() over CUDA events (bench._Timer)."""
    return _Timer(True, warmup, repeat)(lambda _: fn(), [None])


def by_slot(out):
    """The output row of every real slot, in slot order (row order within an expert varies)."""
    rows, slot_rows = out
    sr = slot_rows.ravel()
    return rows[cp.where(sr >= 0, sr, 0)].astype(np.float32) * (sr >= 0)[:, None]


def rel(a, b):
    return float(cp.linalg.norm(a - b) / max(float(cp.linalg.norm(b)), 1e-30))


def workload(T):
    x = _normal(cp, (T, H), dt, 1000 + T)
    ids = layer.route(x).topk_ids
    distinct = int(cp.unique(ids[ids < E]).size)
    return x, ids, distinct * 3 * H * I * dt.itemsize


def mark(stage):
    pass


# syncfree pipelines: (SF_BK, SF_STAGES, SF_MIN_BLOCKS, SF_PREFETCH)
VARIANTS = [(32, 3, 3, 0), (32, 3, 3, 64), (32, 3, 3, 128), (32, 3, 3, 256), (32, 4, 3, 256),
            (32, 6, 2, 256), (64, 3, 2, 0), (64, 3, 2, 256), (64, 3, 3, 256), (64, 4, 2, 256),
            (128, 2, 2, 256), (128, 3, 1, 256)]
names = [k for k, _ in sf.PIPELINE]
if "syncfree" not in parts:
    VARIANTS = []
print(f"\nsyncfree: {'variant':>22} " + " ".join(f"{'T=' + str(t):>16}" for t in
                                                   (64, 128, 256, 1024)), flush=True)
loads = {T: workload(T) for T in (64, 128, 256, 1024)}
base = {}
for v in VARIANTS:
    pipeline = tuple(zip(names, v))
    cells, entry = [], {"pipeline": dict(pipeline), "tokens": {}}
    try:
        for T, (x, ids, nbytes) in loads.items():
            out = sf.syncfree(x, ids, w13, w2, None, mark, pipeline)
            got = by_slot(out)
            if T not in base:
                base[T] = got
            err = rel(got, base[T])
            ms = timed(lambda: sf.syncfree(x, ids, w13, w2, None, mark, pipeline))
            frac = nbytes / (ms * 1e-3) / copy
            entry["tokens"][T] = {"ms": ms, "of_copy": frac, "diff_vs_default": err}
            cells.append(f"{ms:7.3f} {frac:4.0%}{'!' if err > 1e-2 else ' '}  ")
    except Exception as exc:  # a variant the card refuses (shared memory, registers)
        cells.append(f"failed: {type(exc).__name__}: {str(exc)[:60]}")
    result["syncfree"].append(entry)
    print(f"          {str(v):>22} " + " ".join(cells), flush=True)

# pair kernel, rows per warp (GLU, plain)
PAIR_VARIANTS = [(2, 4), (1, 2), (4, 4), (4, 8), (8, 8), (2, 8)] if "pairs" in parts else []
ctype = "__nv_bfloat16"
names_extra = [f"pair_gemv<{ctype},{ctype},{ctype},8,{g},true>" for g, _ in PAIR_VARIANTS] + \
    [f"pair_gemv<{ctype},{ctype},{ctype},8,{p},false>" for _, p in PAIR_VARIANTS]
mod = raw_module("experts.cu", sorted(set(experts_kernel_names() + names_extra)))


def pair_run(x, ids, g, p):
    T, K = ids.shape
    P = T * K
    slot_rows = cp.empty((T, K), np.int32)
    h = cp.empty((P, I), dt)
    rows = cp.empty((P, H), dt)
    for glu, src, stride, div, W, N, Kd, out, R in ((True, x, H, K, w13, I, H, h, g),
                                                    (False, h, I, 1, w2, H, I, rows, p)):
        mod.get_function(f"pair_gemv<{ctype},{ctype},{ctype},8,{R},{str(glu).lower()}>")(
            (-(-N // (PAIR_WARPS * R)), P), (32 * PAIR_WARPS,),
            (src, np.int64(stride), np.int32(div), ids, np.int32(E), W, np.int32(N),
             np.int32(Kd), out, slot_rows))
    return rows, slot_rows


print(f"\npairs:    {'rows/warp':>22} " + " ".join(f"{'T=' + str(t):>16}" for t in (1, 4, 16)))
ploads = {T: workload(T) for T in (1, 4, 16)}
pbase = {}
for g, p in PAIR_VARIANTS:
    cells, entry = [], {"rows_glu": g, "rows_plain": p, "tokens": {}}
    for T, (x, ids, nbytes) in ploads.items():
        ids32 = cp.ascontiguousarray(ids, dtype=np.int32)
        got = by_slot(pair_run(x, ids32, g, p))
        if T not in pbase:
            pbase[T] = got
        err = rel(got, pbase[T])
        ms = timed(lambda: pair_run(x, ids32, g, p), repeat=30)
        frac = nbytes / (ms * 1e-3) / copy
        entry["tokens"][T] = {"ms": ms, "of_copy": frac, "diff_vs_default": err}
        cells.append(f"{ms:7.3f} {frac:4.0%}{'!' if err > 1e-2 else ' '}  ")
    result["pairs"].append(entry)
    print(f"          {str((g, p)):>22} " + " ".join(cells), flush=True)

# cuBLAS batched over capacity-padded experts: every expert's weights are read
print("\ncapacity: C, ms (GEMM 1 + SiLU*up + GEMM 2), share of copy rate (all E experts' bytes)")
all_bytes = E * 3 * H * I * dt.itemsize
emod = experts_module()
from zeromoe_cupy.experts._common import silu_mul  # noqa: E402
for C in (8, 16, 32, 48, 64) if "capacity" in parts else ():
    xs = _normal(cp, (E * C, H), dt, 7)
    gate_up = cp.empty((E * C, 2 * I), dt)
    h = cp.empty((E * C, I), dt)
    rows = cp.empty((E * C, H), dt)
    e = np.arange(E)
    p1 = [cp.asarray((a.data.ptr + e * s).astype(np.uint64)) for a, s in
          ((w13, 2 * I * H * 2), (xs, C * H * 2), (gate_up, C * 2 * I * 2))]
    p2 = [cp.asarray((a.data.ptr + e * s).astype(np.uint64)) for a, s in
          ((w2, H * I * 2), (h, C * I * 2), (rows, C * H * 2))]

    def run_capacity():
        _cublas.batched_gemm_nt(p1[0], p1[1], p1[2], C, 2 * I, H, "bfloat16")
        silu_mul(emod, ctype, gate_up, h, E * C, I)
        _cublas.batched_gemm_nt(p2[0], p2[1], p2[2], C, H, I, "bfloat16")

    ms = timed(run_capacity)
    frac = all_bytes / (ms * 1e-3) / copy
    result["capacity"].append({"capacity": C, "ms": ms, "of_copy": frac})
    print(f"          C={C:3d} {ms:8.3f} ms {frac:5.0%}", flush=True)
    del xs, gate_up, h, rows

# Capacity with only n of the E experts active: batched calls over the n alone (what a host
# count allows), over all E (what capacity does), and over all E where the E - n inactive
# entries all read one dummy expert's weights and write one scratch block (L2 hits?).
if "dummy" in parts:
    C = 16
    print(f"\ncapacity C={C} with n of E experts active: ms over n only / all E / n + dummies")
    xs = _normal(cp, (E * C, H), dt, 7)
    gate_up = cp.empty((E * C, 2 * I), dt)
    h = cp.empty((E * C, I), dt)
    rows = cp.empty((E * C, H), dt)
    mats = ((w13, xs, gate_up, 2 * I * H * 2, C * H * 2, C * 2 * I * 2),
            (w2, h, rows, H * I * 2, C * I * 2, C * H * 2))
    for n in (E, int(E * 0.86), int(E * 0.63), int(E * 0.4)):
        def ptrs(entries, dummy):
            out = []
            for W, src, dst, sw, sx, sd in mats:
                e = np.arange(entries)
                we = np.where(e < n, e, E - 1) if dummy else e
                de = np.where(e < n, e, E - 1) if dummy else e
                out.append([cp.asarray((a.data.ptr + k * st).astype(np.uint64))
                            for a, k, st in ((W, we, sw), (src, e, sx), (dst, de, sd))])
            return out

        cells = []
        for entries, dummy in ((n, False), (E, False), (E, True)):
            p1, p2 = ptrs(entries, dummy)

            def run_it():
                _cublas.batched_gemm_nt(p1[0], p1[1], p1[2], C, 2 * I, H, "bfloat16")
                silu_mul(emod, ctype, gate_up, h, entries * C, I)
                _cublas.batched_gemm_nt(p2[0], p2[1], p2[2], C, H, I, "bfloat16")

            cells.append(timed(run_it))
        result.setdefault("dummy", []).append({"active": n, "ms_active_only": cells[0],
                                               "ms_all": cells[1], "ms_dummies": cells[2]})
        print(f"          n={n:3d} " + " / ".join(f"{c:7.3f}" for c in cells), flush=True)
    del xs, gate_up, h, rows

if "fp8" in parts:
    from zeromoe_cupy import quant
    fp8_layer = layer.quantize("fp8")
    print("\nfp8 layer, eager ms (share of copy rate for the fp8 weight bytes + scales) by "
          "pipeline (G8_BK, G8_STAGES)")
    default_pipeline = quant.fp8_pipeline
    for pipe in ((64, 4), (128, 2), (128, 3), (128, 4)):  # (64, 4): the baseline
        variant = (("G8_BK", pipe[0]), ("G8_STAGES", pipe[1]))
        quant.fp8_pipeline = lambda: variant
        cells = []
        for T in (64, 128, 1024):
            x, ids, nbytes = loads.get(T) or workload(T)
            nbytes = nbytes // 2 * (1 + 4 / (128 * 128))  # e4m3 bytes plus block scales
            ms = timed(lambda: fp8_layer(x))
            y = fp8_layer(x).astype(np.float32)
            result["fp8"].append({"pipeline": list(pipe), "tokens": T, "ms": ms,
                                  "of_copy": nbytes / (ms * 1e-3) / copy})
            cells.append(f"T={T} {ms:7.3f} {nbytes / (ms * 1e-3) / copy:4.0%}")
            if pipe == (64, 4):
                result.setdefault("fp8_y", {})[T] = y
            else:
                cells[-1] += f" diff {rel(y, result['fp8_y'][T]):.1e}"
        print(f"  {str(pipe):>9}  " + "   ".join(cells), flush=True)
    quant.fp8_pipeline = default_pipeline
    result.pop("fp8_y", None)

print(f"\nsweep done in {time.perf_counter() - t_start:.0f} s")
if out_path:
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
