"""Do chunked forwards agree bitwise with one unchunked forward? (LongCat-like widths.)
The default layer (cuBLAS picks kernels by row count) and deterministic=True (fixed-order
router and expert kernels), with the forward time of each at 4096 tokens."""
import cupy as cp

import zeromoe_cupy as zm
from zeromoe_cupy.bench import _Timer

cfg = zm.MoEConfig(hidden_size=2048, intermediate_size=1024, num_experts=128,
                   num_zero_experts=64, top_k=12, use_correction_bias=True,
                   routed_scaling_factor=6.0, dtype="bfloat16")
timer = _Timer(True, 2, 5)
for deterministic in (False, True):
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda", deterministic=deterministic)
    x = cp.random.default_rng(0).standard_normal((4096, 2048), dtype=cp.float32).astype(
        layer.w13.dtype)
    layer.max_chunk_tokens = 4096
    whole = layer(x)
    logits_whole = layer._logits(x)
    print(f"deterministic={deterministic}: forward of 4096 tokens {timer(layer, [x]):.2f} ms")
    for chunk in (2048, 1000, 64, 1):
        layer.max_chunk_tokens = chunk
        y = layer(x)
        differ = int((y.view(cp.uint16) != whole.view(cp.uint16)).any(axis=1).sum())
        logits = cp.concatenate([layer._logits(x[s:s + chunk]) for s in range(0, 4096, chunk)])
        print(f"  max_chunk_tokens={chunk}: {differ} of 4096 rows differ from the unchunked "
              f"bits, max |diff| "
              f"{float(cp.abs(y.astype(cp.float32) - whole.astype(cp.float32)).max()):.3g}; "
              f"router logits differ in {int((logits != logits_whole).any(axis=1).sum())} rows")
