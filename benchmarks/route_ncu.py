"""Launch the routing kernel at the LongCat shape a few times, for a profiler to look at."""
import cupy as cp

from zeromoe_cupy import ops

N, K, T = 768, 12, 65536
logits = cp.random.default_rng(0).standard_normal((T, N), dtype=cp.float32)
bias = cp.zeros(N, cp.float32)
for _ in range(8):
    ops.route(logits, K, e_score_correction_bias=bias, routed_scaling_factor=6.0)
cp.cuda.Device().synchronize()
