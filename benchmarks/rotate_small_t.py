"""Per-call times of T=1 forwards: one input repeated vs 16 inputs rotated (CUDA events)."""
import cupy as cp
import numpy as np

import zeromoe_cupy as zm

cfg = zm.MoEConfig.preset("longcat-flash")
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
rng = cp.random.default_rng(0)
xs = [rng.standard_normal((1, cfg.hidden_size), dtype=cp.float32).astype(layer.w13.dtype)
      for _ in range(16)]
layer.warmup()


def times(inputs, n):
    out = []
    for i in range(n):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        layer(inputs[i % len(inputs)])
        b.record()
        b.synchronize()
        out.append(cp.cuda.get_elapsed_time(a, b))
    return np.round(out, 3)


print("same x   ", times(xs[:1], 24))
print("rotated  ", times(xs, 48))
print("rotated 2", times(xs, 48))
print("real experts per input", [int((layer.route(x).topk_ids.get() < 512).sum()) for x in xs])
