"""Launch the routing kernel (T=65536, LongCat shape) and the identity zero-expert pass
(T=16384, H=6144, K=12, bf16) a few times each, for a profiler to look at."""
import cupy as cp
import ml_dtypes
import numpy as np

from zeromoe_cupy import ops

N, K, E = 768, 12, 512
logits = cp.random.default_rng(0).standard_normal((65536, N), dtype=cp.float32)
bias = cp.zeros(N, cp.float32)
for _ in range(3):
    ops.route(logits, K, e_score_correction_bias=bias, routed_scaling_factor=6.0)
T, H = 16384, 6144
x = cp.random.default_rng(1).standard_normal((T, H), dtype=cp.float32).astype(ml_dtypes.bfloat16)
rng = np.random.default_rng(2)
ids = cp.asarray(np.concatenate([rng.integers(0, E, (T, 8)), rng.integers(E, N, (T, 4))], 1)
                 .astype(np.int32))
w = cp.asarray(rng.random((T, K)).astype(np.float32))
for _ in range(3):
    ops.zero_expert_output(x, ids, w, E, "identity", num_zero_experts=256, check_ids=False)
cp.cuda.Device().synchronize()
