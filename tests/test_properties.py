"""Property tests (hypothesis, CPU): random configs and inputs against the float64 reference;
ops never modify inputs; config validation accepts exactly the valid configs."""
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zeromoe_cupy as zm

from conftest import TOL
from helpers import random_layer_weights, random_x

# More examples for a deeper search: ZEROMOE_HYPOTHESIS_EXAMPLES=2000 pytest tests/test_properties.py
SETTINGS = settings(max_examples=int(os.environ.get("ZEROMOE_HYPOTHESIS_EXAMPLES", "40")),
                    deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def configs(draw):
    E = draw(st.integers(1, 12))
    Z = draw(st.integers(0, 6))
    N = E + Z
    groups = draw(st.sampled_from([None] + [g for g in range(1, N + 1) if N % g == 0]))
    topk_group = draw(st.integers(1, groups)) if groups else None
    kmax = N if groups is None else topk_group * (N // groups)
    types = draw(st.one_of(st.sampled_from(["identity", "zero", "constant"]),
                           st.lists(st.sampled_from(["identity", "zero", "constant"]),
                                    min_size=Z, max_size=Z).map(tuple)))
    return zm.MoEConfig(
        hidden_size=draw(st.integers(1, 40)), intermediate_size=draw(st.integers(1, 24)),
        num_experts=E, num_zero_experts=Z, zero_expert_type=types,
        top_k=draw(st.integers(1, kmax)), scoring_func=draw(st.sampled_from(["softmax",
                                                                             "sigmoid"])),
        renormalize=draw(st.booleans()),
        routed_scaling_factor=draw(st.floats(0.5, 4.0)), num_expert_group=groups,
        topk_group=topk_group, dtype=draw(st.sampled_from(["float32", "float16", "bfloat16"])),
        use_correction_bias=draw(st.booleans()))


@SETTINGS
@given(cfg=configs(), T=st.integers(0, 9), seed=st.integers(0, 2**31 - 1),
       deterministic=st.booleans())
def test_layer_matches_reference_on_random_configs(cfg, T, seed, deterministic):
    rng = np.random.default_rng(seed)
    w = random_layer_weights(rng, cfg, bias_scale=0.02 if cfg.use_correction_bias else 0.0)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **w, deterministic=deterministic)
    x = random_x(rng, T, cfg.hidden_size, cfg.dtype)
    snapshot = {k: v.copy() for k, v in w.items()}
    x0 = x.copy()
    r = layer.route(x)
    y = layer(x, routing=r)
    # Compare the experts for the layer's own routing (fp32 vs float64 routing may differ
    # on near ties, which docs/spec.md allows); routing itself is checked in its own tests.
    ref, _ = layer.reference(x, routing=(r.topk_ids, r.topk_weights))
    assert y.shape == x.shape and y.dtype == x.dtype
    # Tiny random shapes cancel: a few terms of size ~1 can sum to ~0.01, in the down
    # projection or across slots. So measure the error against the size of what the rounded
    # sums add up (the bound rounding can promise), which is about ||ref|| when nothing
    # cancels; the strict relative check on ordinary shapes is in test_layer_cpu.py.
    # Values below the dtype's normal range keep only an absolute precision (a subnormal
    # step per rounding, each spread by at most 1 + I through the down projection).
    underflow = float(ml_dtypes.finfo(x.dtype).smallest_subnormal) * (1 + cfg.intermediate_size) \
        * np.sqrt(x.size)
    err = np.linalg.norm(y.astype(np.float64) - ref)
    assert err <= TOL[cfg.dtype] * np.linalg.norm(_magnitude(layer, x, r)) + underflow
    np.testing.assert_array_equal(x, x0)
    for k, v in w.items():
        np.testing.assert_array_equal(v, snapshot[k])
    assert ((r.topk_ids >= 0) & (r.topk_ids < cfg.num_total_experts)).all()


def _magnitude(layer, x, r):
    """sum_k |w_k| * |slot k's output|, with every product and sum inside an expert taken in
    absolute value (|W2| (|h| + |gate| |up|)): the scale of the layer's rounding error."""
    cfg, w = layer.config, layer.numpy_weights()
    E, I = cfg.num_experts, cfg.intermediate_size
    x64 = x.astype(np.float64)
    mag = np.zeros_like(x64)
    for t in range(x.shape[0]):
        for k in range(cfg.top_k):
            e, wk = int(r.topk_ids[t, k]), abs(float(r.topk_weights[t, k]))
            if e < E:
                gu = w["w13"][e].astype(np.float64) @ x64[t]
                g, u = gu[:I], gu[I:]
                h = g / (1 + np.exp(-g)) * u
                mag[t] += wk * (np.abs(w["w2"][e].astype(np.float64)) @ (np.abs(h) +
                                                                         np.abs(g * u)))
            elif cfg.zero_types[e - E] == "identity":
                mag[t] += wk * np.abs(x64[t])
            elif cfg.zero_types[e - E] == "constant":
                mag[t] += wk * (np.abs(x64[t]) +
                                np.abs(w["const_vec"][e - E].astype(np.float64)))
    return mag


VALID_TYPES = ("identity", "zero", "constant")


@SETTINGS
@given(H=st.integers(-2, 5), E=st.integers(-1, 5), Z=st.integers(-1, 4), K=st.integers(-1, 10),
       G=st.one_of(st.none(), st.integers(-1, 10)), TG=st.one_of(st.none(), st.integers(-1, 10)),
       types=st.one_of(st.sampled_from(VALID_TYPES + ("copy",)),
                       st.lists(st.sampled_from(VALID_TYPES), max_size=5).map(tuple)),
       scoring=st.sampled_from(["softmax", "sigmoid", "relu"]),
       dtype=st.sampled_from(["float32", "bfloat16", "int8"]))
def test_config_validation_accepts_exactly_the_valid_configs(H, E, Z, K, G, TG, types, scoring,
                                                              dtype):
    N = E + Z
    valid = (H > 0 and E > 0 and Z >= 0 and 0 < K <= N and scoring != "relu"
             and dtype != "int8"
             and (types in VALID_TYPES if isinstance(types, str) else len(types) == Z)
             and (G is None) == (TG is None)
             and (G is None or (G > 0 and TG > 0 and N % G == 0 and TG <= G
                                and K <= TG * (N // G))))
    kwargs = dict(hidden_size=H, intermediate_size=4, num_experts=E, num_zero_experts=Z,
                  top_k=K, num_expert_group=G, topk_group=TG, zero_expert_type=types,
                  scoring_func=scoring, dtype=dtype)
    if valid:
        zm.MoEConfig(**kwargs)
    else:
        with pytest.raises((ValueError, TypeError)):
            zm.MoEConfig(**kwargs)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 6), H=st.integers(1, 30))
def test_ops_never_modify_inputs(seed, T, H):
    from zeromoe_cupy import ops
    rng = np.random.default_rng(seed)
    E, Z, K, I = 4, 3, 3, 5
    x = random_x(rng, T, H, "float32")
    logits = rng.standard_normal((T, E + Z)).astype(np.float32)
    bias = rng.standard_normal(E + Z).astype(np.float32) * 0.1
    w13 = rng.standard_normal((E, 2 * I, H)).astype(np.float32)
    w2 = rng.standard_normal((E, H, I)).astype(np.float32)
    cv = rng.standard_normal((Z, H)).astype(np.float32)
    cg = rng.standard_normal((Z, 2, H)).astype(np.float32)
    arrays = [x, logits, bias, w13, w2, cv, cg]
    copies = [a.copy() for a in arrays]
    r = ops.route(logits, K, e_score_correction_bias=bias)
    ids, wts = r.topk_ids.copy(), r.topk_weights.copy()
    out = ops.expert_mlp(x, r.topk_ids, w13, w2)
    ops.combine(x, r.topk_ids, r.topk_weights, E, ("constant", "identity", "zero"), out, cv, cg)
    ops.zero_expert_output(x, r.topk_ids, r.topk_weights, E, ("constant", "identity", "zero"),
                           const_vec=cv, const_gate=cg)
    for a, b in zip(arrays, copies):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(r.topk_ids, ids)
    np.testing.assert_array_equal(r.topk_weights, wts)


def test_nan_in_one_token_stays_in_that_row(rng):
    cfg = zm.MoEConfig.preset("tiny")
    layer = zm.ZeroExpertMoE(cfg, device="cpu")
    x = random_x(rng, 6, cfg.hidden_size, cfg.dtype)
    x[2, 5] = np.nan
    r = layer.route(x)
    assert ((r.topk_ids >= 0) & (r.topk_ids < cfg.num_total_experts)).all()
    y = layer(x, routing=r)
    assert np.isnan(y[2]).all()
    assert np.isfinite(np.delete(y, 2, axis=0)).all()


def test_nan_and_inf_logits_give_valid_ids(rng):
    cfg = zm.MoEConfig.preset("tiny")
    layer = zm.ZeroExpertMoE(cfg, device="cpu")
    x = random_x(rng, 4, cfg.hidden_size, cfg.dtype)
    L = rng.standard_normal((4, cfg.num_total_experts)).astype(np.float32)
    L[0] = np.nan
    L[1, 3] = np.inf
    L[2, 3] = -np.inf
    r = layer.route(x, router_logits=L)
    assert ((r.topk_ids >= 0) & (r.topk_ids < cfg.num_total_experts)).all()
    assert r.topk_ids[0].tolist() == [0, 1]  # all NaN: the lowest ids, NaN weights
    assert np.isnan(r.topk_weights[0]).all()
    assert 3 not in r.topk_ids[2]
