"""MoE++: constant, identity and zero experts mixed in one layer, checked against float64.

The preset's zero experts are [constant, constant, identity, zero]. On the CPU the hidden
and intermediate sizes are shrunk so that it runs in seconds; on the GPU (--device cuda)
the full MoE++-7B shapes run.
"""
import argparse
import sys

import numpy as np

import zeromoe_cupy as zm

parser = argparse.ArgumentParser()
parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
parser.add_argument("--tokens", type=int, default=128)
args = parser.parse_args()

small = {} if args.device == "cuda" else dict(hidden_size=192, intermediate_size=256)
cfg = zm.MoEConfig.preset("moe++-7b", **small)
layer = zm.ZeroExpertMoE(cfg, seed=0, device=args.device)
xp = layer.xp
x = xp.asarray(np.random.default_rng(0).standard_normal((args.tokens, cfg.hidden_size))
               .astype(np.float32)).astype(layer.w13.dtype)
r = layer.route(x)
y = layer(x, routing=r)

ids = r.topk_ids.get() if args.device == "cuda" else r.topk_ids
E = cfg.num_experts
print(f"MoE++ {cfg.dtype} H={cfg.hidden_size} I={cfg.intermediate_size}: {E} FFN experts + "
      f"zero experts {list(cfg.zero_types)}, top-{cfg.top_k}, renormalize={cfg.renormalize}")
for j, kind in enumerate(cfg.zero_types):
    print(f"  zero expert {E + j} ({kind:8s}): {int((ids == E + j).sum())} slots")
print(f"FFN experts per token: {(ids < E).sum(axis=1).mean():.2f} of {cfg.top_k}")

ref, _ = layer.reference(x)
err = zm.reference.relative_error(y.get() if args.device == "cuda" else y, ref)
ok = err <= 1e-2
print(f"relative error against the float64 reference: {err:.2e} ({'ok' if ok else 'FAIL'})")
sys.exit(0 if ok else 1)
