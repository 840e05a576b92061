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
    R = cfg.router_hidden_size
    dt = np_dtype(cfg.dtype)
    w = dict(
        router_weight=(rng.standard_normal((N, H if R is None else R))
                       * (H if R is None else R) ** -0.5).astype(np.float32),
        w13=(rng.standard_normal((E, 2 * I, H)) * H ** -0.5).astype(np.float32).astype(dt),
        w2=(rng.standard_normal((E, H, I)) * I ** -0.5).astype(np.float32).astype(dt),
    )
    if cfg.use_correction_bias or bias_scale:
        w["e_score_correction_bias"] = (rng.standard_normal(N) * bias_scale).astype(np.float32)
    if router_bias:
        w["router_bias"] = (rng.standard_normal(N) * 0.1).astype(np.float32)
    if R is not None:  # MoE++'s two-layer router: W1 [R, H]
        w["router_hidden_weight"] = (rng.standard_normal((R, H)) * H ** -0.5).astype(np.float32)
    if cfg.gating_residual:
        w["gate_map"] = (rng.standard_normal((N, N)) * N ** -0.5).astype(np.float32)
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
    # the selection scores do not depend on the renormalization; they do on the logits'
    # normalization (router_logits_norm_std)
    r = zm.reference.route(logits, cfg_like["top_k"], cfg_like.get("scoring_func", "softmax"),
                           bias, False, 1.0,
                           cfg_like.get("num_expert_group"), cfg_like.get("topk_group"),
                           logits_norm_std=cfg_like.get("router_logits_norm_std"))
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


FLT_MIN32 = float(np.finfo(np.float32).min)  # -FLT_MAX


def extreme_routing_case(rng, T, N, scoring, with_bias):
    """Logits (and a bias) where NaN scores meet -inf and -FLT_MAX ones: random finite
    logits, and a few experts each with a NaN score (a NaN logit for sigmoid, in two random
    experts a row; a NaN bias entry, which leaves the weight finite), a -inf and a -FLT_MAX
    selection score (bias entries), all in the top N - 2. Row 0 holds the example of a user
    report: sigmoid logits [0.5, NaN, 0.3, 0.1], the third biased by -FLT_MAX (softmax: 0.2
    for the NaN, as one NaN logit makes a whole softmax row NaN)."""
    logits = rng.standard_normal((T, N)).astype(np.float32)
    bias = (rng.standard_normal(N) * 0.1).astype(np.float32) if with_bias else None
    cols = rng.permutation(N)
    if scoring == "sigmoid":
        for t in range(T):
            logits[t, rng.choice(N, 2, replace=False)] = np.nan
        logits[:, cols[4]] = -np.inf
    if T:
        logits[0, cols[5:9]] = [0.5, np.nan if scoring == "sigmoid" else 0.2, 0.3, 0.1]
    if bias is not None:
        bias[cols[0]] = np.nan
        bias[cols[1]] = -np.inf
        bias[cols[2]] = FLT_MIN32
        bias[cols[3]] = -np.inf
        bias[cols[5:9]] = [0, 0, FLT_MIN32, 0]
    return logits, bias


def underflow_routing_case(rng, T, N, scoring, bias_kind):
    """Logits whose scores underflow fp32 although they are far apart in float64: sigmoid
    logits around -100 (sigmoid < 1e-38), softmax rows with one logit 150 above the others.
    bias_kind: None, "zero" (a bias of 0 everywhere: the sums tie in fp32) or "two" (0 for
    the first half of the experts, 0.01 for the second, as LongCat's real/zero experts)."""
    logits = (rng.standard_normal((T, N)) * 3 - 100).astype(np.float32)
    if scoring == "softmax":
        logits[np.arange(T), rng.integers(0, N, T)] = 50
    bias = None
    if bias_kind == "zero":
        bias = np.zeros(N, np.float32)
    elif bias_kind == "two":
        bias = np.where(np.arange(N) < N // 2, 0, 0.01).astype(np.float32)
    return logits, bias


def biased_tie_case(rng, T, N, scoring, mixed=False):
    """Selection scores s = p + bias that are exactly equal (in fp32 and in float64) between
    experts of unequal biases, and equal in fp32 by underflow between experts of equal biases.

    Every expert but one has a logit near -100 (its score underflows fp32, and in float64 it
    is below half an ulp of its bias: s == bias) and a bias drawn from 0.5, 0.25, 0.125,
    0.0625 (classes of equal bias, whose exact order is their logits'). Expert b has the
    largest logit (score 1.0 exactly, bias -0.25: s = 0.75) and ties exactly with expert a < b
    (bias 0.75): a ranks first, by its lower id, although b's logit is larger. ``mixed`` adds
    a third expert c of bias 0.75 to that tie, c's logit between a's and b's (equal s, not all
    one bias: the ids decide). Returns (logits fp32 [T, N], bias fp32 [N], the expected full
    order int [T, N] by docs/spec.md's rule)."""
    logits = np.clip(rng.standard_normal((T, N)) * 3 - 100, -110, -90).astype(np.float32)
    bias = rng.choice(np.float32([0.5, 0.25, 0.125, 0.0625]), N)
    a, c, b = np.sort(rng.choice(N, 3, replace=False))
    logits[:, b] = 40 if scoring == "sigmoid" else 0  # score 1.0: sigmoid, or softmax's max
    bias[a], bias[b] = 0.75, -0.25
    if mixed:
        bias[c] = 0.75
        logits[:, c] = -95
        logits[:, a] = -99
    level = np.where(np.arange(N) == b, 0.75, bias)
    expected = np.empty((T, N), np.int64)
    for t in range(T):
        def key(e):
            cls = np.flatnonzero(level == level[e])
            uniform = np.all(bias[cls] == bias[e])
            return (-level[e], -logits[t, e] if uniform else 0.0, e)
        expected[t] = sorted(range(N), key=key)
    return logits, bias, expected


def fp16_overflow_case(rng, kind, T=12, H=40, I=48, E=4, Z=2):
    """An fp16 layer (K = 2: a real expert and a "zero" one a token), x, and a routing, where
    y fits fp16 but an intermediate does not. kind "output": expert outputs (the down
    projection) up to about 5e5, routing weights about 1e-3; "activation": gate and up about
    300 (within fp16), silu(gate) * up up to about 1e6, moderate outputs.
    Returns (config, NumPy weights, x, ids, weights, float64 y)."""
    from zeromoe_cupy import reference
    cfg = zm.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_zero_experts=Z,
                       top_k=2, zero_expert_type="zero", dtype="float16")
    up, down, wscale = (10.0, 2000.0, 1e-3) if kind == "output" else (300.0, 3e-3, 0.3)
    w = random_layer_weights(rng, cfg)
    w["w13"] = (w["w13"].astype(np.float32) * up).astype(np.float16)
    w["w2"] = (w["w2"].astype(np.float32) * down).astype(np.float16)
    x = random_x(rng, T, H, "float16")
    ids = np.stack([rng.integers(0, E, T), rng.integers(E, E + Z, T)], axis=1).astype(np.int32)
    weights = (rng.uniform(0.5, 2.0, (T, 2)) * wscale).astype(np.float32)
    y, _ = reference.forward(x, None, w["w13"], w["w2"], top_k=2, num_experts=E,
                             zero_expert_type="zero", routing=(ids, weights))
    # The case is what it says: y fits fp16 with room, the intermediate passes 65504.
    x64 = x.astype(np.float64)
    w13 = w["w13"].astype(np.float64)
    gate, upv = np.einsum("eih,th->tei", w13[:, :I], x64), np.einsum("eih,th->tei", w13[:, I:], x64)
    with np.errstate(over="ignore"):
        h = gate / (1 + np.exp(-gate)) * upv
    out = np.einsum("ehi,tei->teh", w["w2"].astype(np.float64), h)
    assert np.abs(y).max() < 3e4
    assert np.abs(out if kind == "output" else h).max() > 2 * 65504
    assert np.abs(gate).max() < 6e4 and np.abs(upv).max() < 6e4
    return cfg, w, x, ids, weights, y


def fp16_negative_gate_case(rng, T=3, H=8, I=4):
    """An fp16 layer (two real experts, one "zero" one) whose expert 0 has a gate row far past
    -65504 for x = 100 everywhere: in fp16 that gate is -inf, and silu's limit 0 keeps y right.
    Returns (config, NumPy weights, x, ids, weights)."""
    cfg = zm.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=2, num_zero_experts=1,
                       top_k=2, dtype="float16")
    w13 = (rng.standard_normal((2, 2 * I, H)) * 0.1).astype(np.float16)
    w13[0, 1] = -250.0  # gate 1 of expert 0: -250 * 100 * H
    w2 = (rng.standard_normal((2, H, I)) * 0.1).astype(np.float16)
    w = dict(router_weight=np.zeros((3, H), np.float32), w13=w13, w2=w2)
    x = np.full((T, H), 100, np.float16)
    ids = np.array([[0, 1]] * T, np.int32)
    weights = np.full((T, 2), 0.5, np.float32)
    return cfg, w, x, ids, weights


def ep_fp16_cancellation_case(rng, T=10, H=32, I=24):
    """An fp16 layer of two real experts (one per rank when split over two ranks) whose
    outputs are exact negatives (same w13, w2 negated), each about 2e5 in places, chosen by
    every token with weights that differ by under 1 %: each rank's partial sum passes 65504,
    y = (w0 - w1) * FFN_0(x) fits fp16. Returns (config, weights, x, routing, float64 y)."""
    from zeromoe_cupy import reference
    cfg = zm.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=2, num_zero_experts=2,
                       top_k=3, zero_expert_type="identity", dtype="float16")
    w = random_layer_weights(rng, cfg)
    x = random_x(rng, T, H, "float16")
    w13 = w["w13"].astype(np.float32) * np.float32(8)  # activations about 100: w2 within fp16
    w13[1] = w13[0]
    x64, w13_64 = x.astype(np.float64), w13.astype(np.float64)
    gate, up = x64 @ w13_64[0, :I].T, x64 @ w13_64[0, I:].T
    out = (gate / (1 + np.exp(-gate)) * up) @ w["w2"][0].astype(np.float64).T
    w2 = w["w2"].astype(np.float32) * np.float32(2e5 / np.abs(out).max())
    w2[1] = -w2[0]
    assert np.abs(w2).max() < 6e4
    w["w13"], w["w2"] = w13.astype(np.float16), w2.astype(np.float16)
    ids = np.tile(np.array([0, 1, 2], np.int32), (T, 1))
    w0 = rng.uniform(0.6, 1.0, T)
    weights = np.stack([w0, w0 * (1 - rng.uniform(0.002, 0.01, T)),
                        rng.uniform(0.1, 0.5, T)], axis=1).astype(np.float32)
    y, _ = reference.forward(x, None, w["w13"], w["w2"], top_k=3, num_experts=2,
                             zero_expert_type="identity", routing=(ids, weights))
    rank0, _ = reference.forward(x, None, w["w13"], w["w2"], top_k=1, num_experts=2,
                                 zero_expert_type="identity", routing=(ids[:, :1], weights[:, :1]))
    assert np.abs(rank0).max() > 65504 and np.abs(y).max() < 3e4  # the case is what it says
    return cfg, w, x, zm.RoutingResult(ids, weights, None), y



class _RecordingDict(dict):
    """A dict that records every key looked up (present or not)."""

    def __init__(self, d):
        super().__init__(d)
        self.looked_up = set()

    def get(self, key, default=None):
        self.looked_up.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.looked_up.add(key)
        return super().__contains__(key)

    def __getitem__(self, key):
        self.looked_up.add(key)
        return super().__getitem__(key)


def hf_keys_read(config: dict) -> set:
    """The keys of a Hugging Face config dict that ``MoEConfig.from_hf_config`` looks up,
    model_type aside (which keys depends on the flags the dict sets)."""
    from zeromoe_cupy.config import parse_hf_config
    d = _RecordingDict(config)
    parse_hf_config(d)
    return d.looked_up - {"model_type"}
