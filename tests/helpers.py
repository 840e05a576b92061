"""Shared helpers for the tests: random inputs, reference comparisons."""
import numpy as np

import zeromoe_cupy as zm
from zeromoe_cupy._arrays import np_dtype


def random_x(rng, T, H, dtype):
    return rng.standard_normal((T, H)).astype(np.float32).astype(np_dtype(dtype))


def random_layer_weights(rng, cfg, bias_scale=0.0, router_bias=False):
    """Random weights as NumPy arrays (fp32 router, cfg.dtype experts)."""
    H, I, E, Z, N = (cfg.hidden_size, cfg.intermediate_size, cfg.num_experts,
                     cfg.num_zero_experts, cfg.num_total_experts)
    dt = np_dtype(cfg.dtype)
    w = dict(
        router_weight=(rng.standard_normal((N, H)) * H ** -0.5).astype(np.float32),
        w13=(rng.standard_normal((E, 2 * I, H)) * H ** -0.5).astype(np.float32).astype(dt),
        w2=(rng.standard_normal((E, H, I)) * I ** -0.5).astype(np.float32).astype(dt),
    )
    if cfg.use_correction_bias or bias_scale:
        w["e_score_correction_bias"] = (rng.standard_normal(N) * bias_scale).astype(np.float32)
    if router_bias:
        w["router_bias"] = (rng.standard_normal(N) * 0.1).astype(np.float32)
    if cfg.has_constant_experts:
        w["const_vec"] = rng.standard_normal((Z, H)).astype(np.float32).astype(dt)
        w["const_gate"] = (rng.standard_normal((Z, 2, H)) * H ** -0.5).astype(np.float32).astype(dt)
    return w


def reference_of(layer, x, **kw):
    return layer.reference(x, **kw)


def separated_rows(logits, cfg_like, bias=None, rel=1e-6):
    """Rows whose top K+1 selection scores are pairwise apart by more than ``rel`` relative.

    There the ids (set and order) are fixed by the math, not by rounding (docs/spec.md).
    """
    r = zm.reference.route(logits, cfg_like["top_k"], cfg_like.get("scoring_func", "softmax"),
                           bias, cfg_like.get("renormalize", False), 1.0,
                           cfg_like.get("num_expert_group"), cfg_like.get("topk_group"))
    s = np.where(np.isnan(r.selection_scores), -np.inf, r.selection_scores)
    K = cfg_like["top_k"]
    if K >= s.shape[1]:
        K = s.shape[1] - 1
    if K <= 0:
        return np.ones(s.shape[0], bool)
    top = -np.sort(-s, axis=1)[:, :K + 1]
    gaps = top[:, :-1] - top[:, 1:]
    scale = np.maximum(np.abs(top[:, :-1]), 1e-30)
    return np.all(gaps > rel * scale, axis=1)


def one_lane_wins_logits(T, N, order):
    """Logits where experts 0-3, 128-131, 256-259, ... (all owned by routing lane 0) hold the
    top scores, in descending or ascending id order: lane 0 gives more winners than it caches."""
    logits = np.random.default_rng(5).standard_normal((T, N)).astype(np.float32)
    lane0 = np.flatnonzero(np.arange(N) % 128 < 4)
    ramp = np.arange(lane0.size, dtype=np.float32)
    logits[:, lane0] = 10 + (ramp[::-1] if order == "descending" else ramp)
    return logits
