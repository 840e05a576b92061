"""The LongCat-Flash layer (512 SwiGLU + 256 identity experts, top-12, bf16) on the GPU,
with a timing line and a check of sampled rows against the float64 reference."""
import sys
import time

import numpy as np

import zeromoe_cupy as zm

if not zm.gpu_available():
    print("skipped: the LongCat-Flash layer needs a CUDA GPU (about 40 GB for its weights)")
    sys.exit(0)

import cupy as cp  # noqa: E402

T = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
cfg = zm.MoEConfig.preset("longcat-flash")
t0 = time.perf_counter()
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
layer.warmup()
print(f"built {layer} in {time.perf_counter() - t0:.1f} s")
x = cp.random.default_rng(0).standard_normal((T, cfg.hidden_size), dtype=cp.float32).astype(
    layer.w13.dtype)
r = layer.route(x)
y = layer(x, routing=r)
start, stop = cp.cuda.Event(), cp.cuda.Event()
times = []
for _ in range(10):
    start.record()
    layer(x)
    stop.record()
    stop.synchronize()
    times.append(cp.cuda.get_elapsed_time(start, stop))
ids = r.topk_ids.get()
print(f"T={T}: forward {np.median(times):.3f} ms (median of 10), "
      f"{(ids < cfg.num_experts).sum(1).mean():.2f} of 12 slots to real experts")

# Check 8 sampled rows against float64, moving only the experts they use to the host.
rows = np.sort(np.random.default_rng(1).choice(T, min(T, 8), replace=False))
E = cfg.num_experts
used = np.unique(ids[rows][ids[rows] < E])
remap = np.concatenate([np.full(E, -1), np.arange(cfg.num_zero_experts) + used.size])
remap[used] = np.arange(used.size)
sub = cp.asarray(used)
ref, _ = zm.reference.forward(x.get()[rows], None, layer.w13[sub].get(), layer.w2[sub].get(),
                              top_k=cfg.top_k, num_experts=used.size,
                              routing=(remap[ids[rows]], r.topk_weights.get()[rows]))
err = zm.reference.relative_error(y.get()[rows], ref)
ok = err <= 1e-2
print(f"sampled rows: relative error against float64 {err:.2e} ({'ok' if ok else 'FAIL'})")
sys.exit(0 if ok else 1)
