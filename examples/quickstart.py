"""Quickstart, NumPy style: build the tiny preset, run it, look at what the router did.

Runs on the CPU (NumPy) or, with --device cuda, on the GPU. Exits non-zero if the output
disagrees with the float64 reference.
"""
import argparse
import sys

import numpy as np

import zeromoe_cupy as zm

parser = argparse.ArgumentParser()
parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
parser.add_argument("--tokens", type=int, default=256)
args = parser.parse_args()
if args.tokens < 1:
    parser.error(f"argument --tokens: expected an int >= 1, got {args.tokens}")

cfg = zm.MoEConfig.preset("tiny")                 # H=256, I=512, 8 real + 4 identity experts
layer = zm.ZeroExpertMoE(cfg, seed=0, device=args.device)
xp = layer.xp
x = xp.asarray(np.random.default_rng(0).standard_normal((args.tokens, cfg.hidden_size))
               .astype(np.float32))

r = layer.route(x)                                # ids, weights, per-expert counts
y = layer(x, routing=r)                           # reuse the routing: no second pass

ids = r.topk_ids.get() if args.device == "cuda" else r.topk_ids
counts = r.expert_counts.get() if args.device == "cuda" else r.expert_counts
E, K = cfg.num_experts, cfg.top_k
real_per_token = (ids < E).sum(axis=1)
print(f"{args.tokens} tokens, {E} real + {cfg.num_zero_experts} zero experts, top-{K}")
print(f"real experts per token: mean {real_per_token.mean():.2f}, "
      f"histogram {np.bincount(real_per_token, minlength=K + 1).tolist()} (0..{K})")
print(f"share of slots sent to zero experts: {(ids >= E).mean():.1%}")
print(f"load per real expert:  {counts[:E].tolist()}")
print(f"load per zero expert:  {counts[E:].tolist()}")

ref, _ = layer.reference(x)
err = zm.reference.relative_error(y.get() if args.device == "cuda" else y, ref)
ok = err <= 1e-5
print(f"relative error against the float64 reference: {err:.2e} ({'ok' if ok else 'FAIL'})")
sys.exit(0 if ok else 1)
