"""Do chunked forwards agree bitwise with one unchunked forward? (LongCat-like widths.)
Per expert strategy: "auto" (cuBLAS picks kernels by row count) and "pairs" (fixed-order sums
in our own kernel)."""
import cupy as cp

import zeromoe_cupy as zm

cfg = zm.MoEConfig(hidden_size=2048, intermediate_size=1024, num_experts=128,
                   num_zero_experts=64, top_k=12, use_correction_bias=True,
                   routed_scaling_factor=6.0, dtype="bfloat16")
layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
x = cp.random.default_rng(0).standard_normal((4096, 2048), dtype=cp.float32).astype(
    layer.w13.dtype)
for strategy in ("auto", "pairs"):
    layer.expert_strategy = strategy
    layer.max_chunk_tokens = 4096
    whole = layer(x)
    logits_whole = layer._logits(x)
    for chunk in (2048, 1000, 64, 1):
        layer.max_chunk_tokens = chunk
        y = layer(x)
        differ = int((y != whole).any(axis=1).sum())
        logits = cp.concatenate([layer._logits(x[s:s + chunk]) for s in range(0, 4096, chunk)])
        print(f"{strategy}: max_chunk_tokens={chunk}: {differ} of 4096 rows differ from the "
              f"unchunked bits, max |diff| "
              f"{float(cp.abs(y.astype(cp.float32) - whole.astype(cp.float32)).max()):.3g}; "
              f"router logits differ in {int((logits != logits_whole).any(axis=1).sum())} rows")
