"""MoE++ options (docs/spec.md "MoE++ options") against the float64 reference: each alone and all
together, on the NumPy path and (marker gpu) on the GPU; their errors."""
import dataclasses

import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy import reference
from zeromoe_cupy.reference import relative_error
from zeromoe_cupy.routing import route

from conftest import TOL
from helpers import random_layer_weights, random_x, separated_rows

BASE = dict(hidden_size=48, intermediate_size=24, num_experts=8, num_zero_experts=4, top_k=2,
            zero_expert_type=("constant", "constant", "identity", "zero"))

# name: config overrides (each option alone, then together)
OPTIONS = {
    "drop_zero": dict(renormalize="drop_zero"),
    "drop_zero_k3_two_zero": dict(renormalize="drop_zero", top_k=3,
                                  zero_expert_type=("zero", "identity", "zero", "constant")),
    "input_scale_2": dict(expert_input_scale=2.0),
    "input_scale_0.7": dict(expert_input_scale=0.7),
    "two_layer_router": dict(router_hidden_size=96),
    "gating_residual": dict(gating_residual=True),
    "logits_norm": dict(router_logits_norm_std=1.0),
    "logits_norm_sigma_2.5": dict(router_logits_norm_std=2.5),
    "all": dict(renormalize="drop_zero", expert_input_scale=2.0, router_hidden_size=96,
                gating_residual=True, router_logits_norm_std=1.0),
    "all_mixtral": dict(renormalize=True, router_hidden_size=96, gating_residual=True,
                        router_logits_norm_std=1.0, routed_scaling_factor=1.5),
    "all_sigmoid_bias": dict(renormalize="drop_zero", expert_input_scale=0.5,
                             gating_residual=True, router_logits_norm_std=0.8,
                             scoring_func="sigmoid", use_correction_bias=True),
}
DTYPES = ["float32", "float16", "bfloat16"]


def build(case, dtype, rng, device="cpu"):
    cfg = zm.MoEConfig(**{**BASE, **OPTIONS[case], "dtype": dtype})
    w = random_layer_weights(rng, cfg, bias_scale=0.02 if cfg.use_correction_bias else 0.0)
    if device == "cuda":
        import cupy as cp
        w = {k: cp.asarray(v) for k, v in w.items()}
    return cfg, zm.ZeroExpertMoE.from_weights(cfg, **w)


def prev_logits(rng, cfg, T):
    if not cfg.gating_residual:
        return None
    return (rng.standard_normal((T, cfg.num_total_experts)) * 2).astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_options_match_reference(case, dtype, rng):
    cfg, layer = build(case, dtype, rng)
    T = 40
    x = random_x(rng, T, cfg.hidden_size, dtype)
    prev = prev_logits(rng, cfg, T)
    x_before = x.copy()
    prev_before = None if prev is None else prev.copy()
    y, L = layer(x, prev_router_logits=prev, return_router_logits=True)
    ref, ref_routing = layer.reference(x, prev_router_logits=prev)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert L.dtype == np.float32 and L.shape == (T, cfg.num_total_experts)
    assert relative_error(y, ref) <= TOL[dtype]
    assert relative_error(L, ref_routing.router_logits) <= 1e-6
    np.testing.assert_array_equal(x, x_before)
    if prev is not None:
        np.testing.assert_array_equal(prev, prev_before)

    # route() takes the same logits: ids equal the reference's where the scores are apart
    r = layer.route(x, prev_router_logits=prev)
    ok = separated_rows(ref_routing.router_logits, dict(
        top_k=cfg.top_k, scoring_func=cfg.scoring_func,
        router_logits_norm_std=cfg.router_logits_norm_std),
        bias=None if layer.e_score_correction_bias is None
        else layer.e_score_correction_bias.astype(np.float64))
    assert ok.mean() > 0.8
    np.testing.assert_array_equal(r.topk_ids[ok], ref_routing.topk_ids[ok])
    np.testing.assert_allclose(r.topk_weights[ok], ref_routing.topk_weights[ok], rtol=1e-5,
                               atol=1e-7)

    # the returned logits stand for L when passed back: the same routing, the same output
    y2, L2 = layer(x, router_logits=L, return_router_logits=True)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(L2, L)

    # chunked calls: the same answers up to rounding, logits assembled in token order
    layer.max_chunk_tokens = 7
    yc, Lc = layer(x, prev_router_logits=prev, return_router_logits=True)
    assert relative_error(yc, ref) <= TOL[dtype]
    assert relative_error(Lc, ref_routing.router_logits) <= 1e-6


def test_gating_residual_threads_through_layers(rng):
    # Three layers: the first gets no residual, each next one the previous layer's logits.
    cfg = zm.MoEConfig(**{**BASE, **OPTIONS["all"], "dtype": "float32"})
    layers = [zm.ZeroExpertMoE.from_weights(cfg, **random_layer_weights(rng, cfg))
              for _ in range(3)]
    x = random_x(rng, 25, cfg.hidden_size, "float32")
    prev = ref_prev = None
    for layer in layers:
        y, prev = layer(x, prev_router_logits=prev, return_router_logits=True)
        ref, ref_r = layer.reference(x, prev_router_logits=ref_prev)
        ref_prev = ref_r.router_logits
        assert relative_error(y, ref) <= TOL["float32"]
        assert relative_error(prev, ref_prev) <= 1e-6
    # the residual term changes the logits (it is not silently dropped)
    L_alone = layers[-1]._logits(x)
    assert relative_error(L_alone, ref_prev) > 1e-2


def test_drop_zero_weights_by_hand():
    # E=2, zero experts (zero, identity, zero); logits pick the slots directly.
    cfg = zm.MoEConfig(hidden_size=6, intermediate_size=4, num_experts=2, num_zero_experts=3,
                       top_k=2, zero_expert_type=("zero", "identity", "zero"),
                       renormalize="drop_zero", routed_scaling_factor=2.0, dtype="float32")
    layer = zm.ZeroExpertMoE(cfg, device="cpu")
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    big = np.float32(20)
    L = np.zeros((3, 5), np.float32)
    L[0, [3, 2]] = big, big - 1   # identity + zero: identity alone, weight 1 (* rsf)
    L[1, [2, 4]] = big, big - 1   # both slots zero-type: all weights 0, no NaN
    L[2, [0, 1]] = big, big - 1   # two real experts: plain renormalization
    r = layer.route(x, router_logits=L)
    np.testing.assert_array_equal(r.topk_ids, [[3, 2], [2, 4], [0, 1]])
    np.testing.assert_array_equal(r.topk_weights[0], [2.0, 0.0])
    np.testing.assert_array_equal(r.topk_weights[1], [0.0, 0.0])
    p = np.exp([0.0, -1.0]) / np.exp([0.0, -1.0]).sum() * 2
    np.testing.assert_allclose(r.topk_weights[2], p, rtol=1e-6)
    y = layer(x, router_logits=L)
    np.testing.assert_array_equal(y[0], 2 * x[0])
    np.testing.assert_array_equal(y[1], np.zeros(6, np.float32))
    ref, ref_r = layer.reference(x, router_logits=L)
    np.testing.assert_allclose(ref_r.topk_weights, r.topk_weights, rtol=1e-6)
    assert relative_error(y, ref) <= TOL["float32"]


def test_logits_normalization_by_hand():
    # normalized scores: softmax(L / (std(L) / sigma)); equal logits (std 0) keep L
    L = np.array([[1.0, 2.0, 4.0, 0.5], [3.0, 3.0, 3.0, 3.0]], np.float32)
    r = route(L, 2, logits_norm_std=2.0)
    z = L[0] / (np.std(L[0].astype(np.float64), ddof=1) / 2.0)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(r.topk_weights[0], p[[2, 1]], rtol=1e-6)
    np.testing.assert_allclose(r.topk_weights[1], [0.25, 0.25], rtol=1e-7)
    assert not np.isnan(r.topk_weights).any()


EXTREME_SCALES = [1e-40, 1e-25, 1e-22, 1e19, 1e37, "max"]


def extreme_logits(rng, T, N, scale):
    """Random fp32 logits at one scale ("max": +-3e38 beside ordinary logits, and rows spread
    up to 3e38); row 1 all equal."""
    if scale == "max":
        L = rng.standard_normal((T, N))
        L[T // 2:] = np.clip(L[T // 2:] * 1e38, -3e38, 3e38)
        L = L.astype(np.float32)
        L[:, 5], L[:, 6] = 3e38, -3e38
        L[1] = -3e38
    else:
        L = (rng.standard_normal((T, N)) * scale).astype(np.float32)
        L[1] = np.float32(0.75 * scale)
    return L


@pytest.mark.parametrize("scale", EXTREME_SCALES)
def test_logits_normalization_at_extreme_scales(scale, rng):
    # Logits near fp32's limits: the std neither underflows to 0 (the raw L used instead)
    # nor overflows (the scores squashed); only equal logits keep L, and a NaN or an
    # infinite logit makes the token's weights NaN with valid ids.
    cfg, layer = build("logits_norm", "float32", rng)
    T, N = 8, cfg.num_total_experts
    L = extreme_logits(rng, T, N, scale)
    L_before = L.copy()
    r = route(L, cfg.top_k, renormalize=True, logits_norm_std=1.0)
    ref = reference.route(L, cfg.top_k, renormalize=True, logits_norm_std=1.0)
    np.testing.assert_array_equal(r.topk_ids, ref.topk_ids)
    np.testing.assert_allclose(r.topk_weights, ref.topk_weights, rtol=1e-5)
    np.testing.assert_array_equal(L, L_before)

    x = random_x(rng, T, cfg.hidden_size, "float32")
    y = layer(x, router_logits=L)
    assert relative_error(y, layer.reference(x, router_logits=L)[0]) <= TOL["float32"]

    bad = L.copy()
    bad[2, 3], bad[3, 0] = np.nan, np.inf
    r = route(bad, cfg.top_k, renormalize=True, logits_norm_std=1.0)
    assert np.isnan(r.topk_weights[2:4]).all()
    assert ((r.topk_ids >= 0) & (r.topk_ids < N)).all()
    ok = np.r_[0:2, 4:T]
    np.testing.assert_array_equal(r.topk_ids[ok], ref.topk_ids[ok])


def test_expert_input_scale_rounds_to_the_dtype(rng):
    # s * x is rounded to bf16 once: a scale of 2 is exact, so the identity share is 2x
    cfg = zm.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=2, num_zero_experts=1,
                       top_k=1, expert_input_scale=2.0, renormalize=True, dtype="bfloat16")
    layer = zm.ZeroExpertMoE(cfg, device="cpu")
    x = random_x(rng, 5, 16, "bfloat16")
    L = np.zeros((5, 3), np.float32)
    L[:, 2] = 5.0
    y = layer(x, router_logits=L)
    np.testing.assert_array_equal(y, (x.astype(np.float32) * 2).astype(x.dtype))


def test_layer_without_router_needs_logits(rng):
    cfg = zm.MoEConfig(**{**BASE, **OPTIONS["all"], "dtype": "float32"})
    w = random_layer_weights(rng, cfg)
    for k in ("router_weight", "router_hidden_weight", "gate_map"):
        w.pop(k)
    layer = zm.ZeroExpertMoE.from_weights(cfg, router_weight=None, **w)
    assert layer.router_weight is None and layer.gate_map is None
    x = random_x(rng, 9, cfg.hidden_size, "float32")
    for call in (lambda: layer(x), lambda: layer.route(x), lambda: layer.reference(x)):
        with pytest.raises(ValueError, match="router_logits"):
            call()
    L = rng.standard_normal((9, cfg.num_total_experts)).astype(np.float32)
    y, L_out = layer(x, router_logits=L, return_router_logits=True)
    np.testing.assert_array_equal(L_out, L)
    for chunk in (16, 4):  # one call and chunks: L comes back as a new array, never the caller's
        layer.max_chunk_tokens = chunk
        L_in = L.copy()
        _, L_out = layer(x, router_logits=L_in, return_router_logits=True)
        assert not np.shares_memory(L_out, L_in)
        L_out += 1.0  # the caller threads L on, writing into it
        np.testing.assert_array_equal(L_in, L)
    ref, _ = layer.reference(x, router_logits=L)
    assert relative_error(y, ref) <= TOL["float32"]


def test_random_layers_have_the_option_weights():
    cfg = zm.MoEConfig(**{**BASE, **OPTIONS["all"], "dtype": "float32"})
    layer = zm.ZeroExpertMoE(cfg, device="cpu", seed=3)
    N = cfg.num_total_experts
    assert layer.router_weight.shape == (N, 96)
    assert layer.router_hidden_weight.shape == (96, cfg.hidden_size)
    assert layer.gate_map.shape == (N, N)
    plain = zm.ZeroExpertMoE(zm.MoEConfig(**{**BASE, "dtype": "float32"}), device="cpu")
    assert plain.router_hidden_weight is None and plain.gate_map is None


def test_moepp_7b_preset_is_the_published_config():
    c = zm.MoEConfig.preset("moe++-7b")
    assert (c.hidden_size, c.intermediate_size, c.num_experts, c.num_zero_experts, c.top_k) == \
        (1536, 4096, 16, 4, 2)
    assert c.zero_types == ("constant", "constant", "identity", "zero")
    assert c.renormalize == "drop_zero" and c.gating_residual
    assert c.router_logits_norm_std == 1.0 and c.router_hidden_size is None
    assert c.expert_input_scale == 1.0 and c.routed_scaling_factor == 1.0
    assert c.drop_experts == (False,) * 19 + (True,)


CFG_BAD = [
    (dict(renormalize="dropzero"), TypeError, "renormalize"),
    (dict(renormalize=1), TypeError, "renormalize"),
    (dict(renormalize=None), TypeError, "renormalize"),
    (dict(expert_input_scale=0.0), ValueError, "expert_input_scale"),
    (dict(expert_input_scale=-2.0), ValueError, "expert_input_scale"),
    (dict(expert_input_scale=float("nan")), ValueError, "expert_input_scale"),
    (dict(expert_input_scale=float("inf")), ValueError, "expert_input_scale"),
    (dict(expert_input_scale="2"), TypeError, "expert_input_scale"),
    (dict(expert_input_scale=True), TypeError, "expert_input_scale"),
    (dict(router_hidden_size=0), ValueError, "router_hidden_size"),
    (dict(router_hidden_size=8.0), TypeError, "router_hidden_size"),
    (dict(gating_residual=1), TypeError, "gating_residual"),
    (dict(router_logits_norm_std=0.0), ValueError, "router_logits_norm_std"),
    (dict(router_logits_norm_std=float("inf")), ValueError, "router_logits_norm_std"),
    (dict(router_logits_norm_std="1"), TypeError, "router_logits_norm_std"),
]


@pytest.mark.parametrize("override,exc,name", CFG_BAD)
def test_bad_option_values_raise_naming_the_field(override, exc, name):
    with pytest.raises(exc, match=name):
        zm.MoEConfig(**{**BASE, **override})


def test_bad_weights_and_inputs_raise(rng):
    cfg = zm.MoEConfig(**{**BASE, **OPTIONS["all"], "dtype": "float32"})
    N, H = cfg.num_total_experts, cfg.hidden_size
    w = random_layer_weights(rng, cfg)
    for key, bad in (("gate_map", np.zeros((N, N + 1), np.float32)),
                     ("gate_map", np.zeros((N,), np.float32)),
                     ("router_hidden_weight", np.zeros((96, H + 1), np.float32)),
                     ("router_weight", np.zeros((N, H), np.float32))):  # H, not R
        with pytest.raises(ValueError, match=key):
            zm.ZeroExpertMoE.from_weights(cfg, **{**w, key: bad})
    for key in ("gate_map", "router_hidden_weight"):  # required by the config
        with pytest.raises(ValueError, match=key):
            zm.ZeroExpertMoE.from_weights(cfg, **{k: v for k, v in w.items() if k != key})
    plain = zm.MoEConfig(**{**BASE, "dtype": "float32"})
    wp = random_layer_weights(rng, plain)
    for key, extra in (("gate_map", np.zeros((N, N), np.float32)),
                       ("router_hidden_weight", np.zeros((96, H), np.float32))):
        with pytest.raises(ValueError, match=key):  # the config does not use it
            zm.ZeroExpertMoE.from_weights(plain, **wp, **{key: extra})

    layer = zm.ZeroExpertMoE.from_weights(cfg, **w)
    x = random_x(rng, 6, H, "float32")
    good = rng.standard_normal((6, N)).astype(np.float32)
    for bad in (good[:5], good[:, :-1], good[None]):
        with pytest.raises(ValueError, match="prev_router_logits"):
            layer(x, prev_router_logits=bad)
        with pytest.raises(ValueError, match="prev_router_logits"):
            layer.route(x, prev_router_logits=bad)
    with pytest.raises(TypeError, match="prev_router_logits"):
        layer(x, prev_router_logits=good.astype(np.int32))
    # given logits stand for L after the residual (docs/spec.md): none is added to them, and
    # they come back as L unchanged; prev_router_logits is still checked
    other = rng.standard_normal((6, N)).astype(np.float32)
    y_given, L_given = layer(x, router_logits=good, prev_router_logits=other,
                             return_router_logits=True)
    np.testing.assert_array_equal(L_given, good)
    ref, _ = layer.reference(x, router_logits=good)
    assert relative_error(y_given, ref) <= 1e-5
    np.testing.assert_array_equal(y_given, layer(x, router_logits=good))
    np.testing.assert_array_equal(layer.route(x, good, prev_router_logits=other).topk_ids,
                                  layer.route(x, good).topk_ids)
    with pytest.raises(ValueError, match="prev_router_logits"):
        layer(x, router_logits=good, prev_router_logits=good[:5])
    with pytest.raises(ValueError, match="prev_router_logits"):  # routing= computes no logits
        layer(x, routing=layer.route(x), prev_router_logits=good)
    with pytest.raises(ValueError, match="return_router_logits"):
        layer(x, routing=layer.route(x), return_router_logits=True)
    with pytest.raises(TypeError, match="return_router_logits"):
        layer(x, return_router_logits=1)
    plain_layer = zm.ZeroExpertMoE.from_weights(plain, **wp)
    with pytest.raises(ValueError, match="prev_router_logits"):  # no gating residual
        plain_layer(x, prev_router_logits=good)


def test_route_arguments_raise():
    L = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    with pytest.raises(TypeError, match="renormalize"):
        route(L, 2, renormalize="sometimes")
    with pytest.raises(ValueError, match="drop_experts"):
        route(L, 2, renormalize="drop_zero")
    with pytest.raises(ValueError, match="drop_experts"):
        route(L, 2, renormalize="drop_zero", drop_experts=[True, False])
    with pytest.raises(ValueError, match="drop_experts"):
        route(L, 2, renormalize=True, drop_experts=[False] * 6)
    with pytest.raises(TypeError, match="drop_experts"):  # ints, not bools
        route(L, 2, renormalize="drop_zero", drop_experts=np.array([1, 0, 0, 0, 0, 0]))
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="logits_norm_std"):
            route(L, 2, logits_norm_std=sigma)
    for sigma in (True, "1", None, [1.0]):
        if sigma is not None:
            with pytest.raises(TypeError, match="logits_norm_std"):
                route(L, 2, logits_norm_std=sigma)


# --- GPU (marker gpu) ---------------------------------------------------------------------------
# Every option with the default expert path; all of them together on every path.
GPU_CASES = [(case, "auto") for case in sorted(OPTIONS)] + [
    ("all", s) for s in ("pairs", "grouped", "padded", "fixed")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,strategy", GPU_CASES)
def test_options_gpu_match_reference(case, strategy, dtype, rng):
    import cupy as cp
    cfg, layer = build(case, dtype, rng, device="cuda")
    layer.expert_strategy = strategy
    T = 40
    x = cp.asarray(random_x(rng, T, cfg.hidden_size, dtype))
    prev_h = prev_logits(rng, cfg, T)
    prev = None if prev_h is None else cp.asarray(prev_h)
    x_before = x.copy()
    y, L = layer(x, prev_router_logits=prev, return_router_logits=True)
    assert isinstance(y, cp.ndarray) and isinstance(L, cp.ndarray)
    assert L.dtype == np.float32 and L.shape == (T, cfg.num_total_experts)
    ref, ref_routing = layer.reference(x, prev_router_logits=prev_h)
    assert relative_error(y.get(), ref) <= TOL[dtype]
    assert relative_error(L.get(), ref_routing.router_logits) <= 1e-6
    cp.testing.assert_array_equal(x, x_before)
    # the same call again, and from its own logits: the same bits
    cp.testing.assert_array_equal(layer(x, prev_router_logits=prev), y)
    cp.testing.assert_array_equal(layer(x, router_logits=L), y)
    r = layer.route(x, prev_router_logits=prev)
    cp.testing.assert_array_equal(layer(x, routing=r), y)
    # chunked, and a single token (the router's matrix-vector path)
    layer.max_chunk_tokens = 7
    yc, Lc = layer(x, prev_router_logits=prev, return_router_logits=True)
    assert relative_error(yc.get(), ref) <= TOL[dtype]
    assert relative_error(Lc.get(), ref_routing.router_logits) <= 1e-6
    y1 = layer(x[:1], prev_router_logits=None if prev is None else prev[:1])
    ref1, _ = layer.reference(x[:1], prev_router_logits=None if prev_h is None else prev_h[:1])
    assert relative_error(y1.get(), ref1) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("scale", EXTREME_SCALES)
@pytest.mark.parametrize("N,K,scoring,groups,tg", [(20, 2, "softmax", None, None),
                                                   (256, 8, "sigmoid", 8, 4)])
def test_route_kernel_logits_normalization_at_extreme_scales(scale, N, K, scoring, groups, tg,
                                                             rng):
    # The kernel's normalization at fp32's limits, as the float64 reference; a NaN or an
    # infinite logit makes the token's weights NaN with valid ids.
    import cupy as cp
    L = extreme_logits(rng, 64, N, scale)
    L[2, 3], L[3, 0] = np.nan, np.inf
    bias = (rng.standard_normal(N) * 0.01).astype(np.float32) if groups else None
    args = dict(scoring_func=scoring, renormalize=True, num_expert_group=groups,
                topk_group=tg, logits_norm_std=1.0)
    r = route(cp.asarray(L), K, e_score_correction_bias=None if bias is None
              else cp.asarray(bias), **args)
    ref = reference.route(L, K, correction_bias=bias, **args)
    ok = np.ones(64, bool)
    ok[2:4] = False
    ids, w = r.topk_ids.get(), r.topk_weights.get()
    np.testing.assert_array_equal(ids[ok], ref.topk_ids[ok])
    np.testing.assert_allclose(w[ok], ref.topk_weights[ok], rtol=1e-5)
    assert np.isnan(w[2:4]).all() and ((ids >= 0) & (ids < N)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 1000, 20000])
@pytest.mark.parametrize("N,K,drop", [(20, 2, [19]), (64, 8, [3, 31, 32, 40, 63]),
                                      (768, 12, list(range(512, 768, 2))),
                                      (1024, 32, list(range(0, 1024, 3)))])
def test_route_kernel_drop_zero_matches_reference(T, N, K, drop, rng):
    import cupy as cp
    from zeromoe_cupy import ops
    mask = np.zeros(N, bool)
    mask[drop] = True
    logits_h = rng.standard_normal((T, N)).astype(np.float32)
    logits_h[: T // 4, drop[:K]] += 30  # some tokens send every slot to dropped experts
    r = ops.route(cp.asarray(logits_h), K, renormalize="drop_zero", drop_experts=mask,
                  routed_scaling_factor=2.0, logits_norm_std=1.0)
    ids, w = r.topk_ids.get(), r.topk_weights.get()
    assert not np.isnan(w).any()
    sample = np.arange(T) if T <= 1000 else rng.choice(T, 500, replace=False)
    ref = reference.route(logits_h[sample], K, renormalize="drop_zero", drop_experts=mask,
                          routed_scaling_factor=2.0, logits_norm_std=1.0)
    ok = separated_rows(logits_h[sample].astype(np.float64),
                        dict(top_k=K, router_logits_norm_std=1.0))
    assert ok.mean() > 0.5
    np.testing.assert_array_equal(ids[sample][ok], ref.topk_ids[ok])
    np.testing.assert_allclose(w[sample][ok], ref.topk_weights[ok], rtol=1e-5, atol=1e-9)
    assert (w[mask[ids]] == 0).all()  # every dropped slot weighs 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_input_kernel_rounds_once(dtype, rng):
    import cupy as cp
    from zeromoe_cupy.zero_experts import scaled_input
    x_h = random_x(rng, 37, 130, dtype)
    wide_h = random_x(rng, 37, 200, dtype)
    wide_h[:, :130] = x_h
    wide = cp.asarray(wide_h)
    for x in (cp.asarray(x_h), wide[:, :130]):  # contiguous and strided rows
        for s in (2.0, 0.7, 3.0):
            out = scaled_input(x, s)
            want = (x_h.astype(np.float32) * np.float32(s)).astype(x_h.dtype)
            np.testing.assert_array_equal(out.get(), want)
    assert scaled_input(wide, 1.0) is wide


@pytest.mark.gpu
def test_moepp_7b_gpu_with_residual_chain(rng):
    import cupy as cp
    cfg = zm.MoEConfig.preset("moe++-7b")
    layers = [zm.ZeroExpertMoE(cfg, seed=s, device="cuda") for s in range(2)]
    x = cp.asarray(random_x(rng, 48, cfg.hidden_size, cfg.dtype))  # the reference is slow
    prev = ref_prev = None
    for layer in layers:
        y, prev = layer(x, prev_router_logits=prev, return_router_logits=True)
        ref, ref_r = layer.reference(x, prev_router_logits=ref_prev)
        ref_prev = ref_r.router_logits
        assert relative_error(y.get(), ref) <= TOL[cfg.dtype]


@pytest.mark.gpu
def test_deterministic_gpu_with_options(rng):
    import cupy as cp
    cfg = zm.MoEConfig(**{**BASE, **OPTIONS["all"], "dtype": "bfloat16"})
    w = {k: cp.asarray(v) for k, v in random_layer_weights(rng, cfg).items()}
    layer = zm.ZeroExpertMoE.from_weights(cfg, deterministic=True, **w)
    x = cp.asarray(random_x(rng, 50, cfg.hidden_size, "bfloat16"))
    prev = cp.asarray(prev_logits(rng, cfg, 50))
    y, L = layer(x, prev_router_logits=prev, return_router_logits=True)
    y1, L1 = layer(x[13:14], prev_router_logits=prev[13:14], return_router_logits=True)
    cp.testing.assert_array_equal(y1, y[13:14])
    cp.testing.assert_array_equal(L1, L[13:14])


@pytest.mark.gpu
def test_layer_without_router_gpu(rng):
    import cupy as cp
    cfg = dataclasses.replace(zm.MoEConfig(**{**BASE, **OPTIONS["all"]}), dtype="bfloat16")
    w = random_layer_weights(rng, cfg)
    for k in ("router_weight", "router_hidden_weight", "gate_map"):
        w.pop(k)
    layer = zm.ZeroExpertMoE.from_weights(cfg, router_weight=None,
                                          **{k: cp.asarray(v) for k, v in w.items()})
    x = cp.asarray(random_x(rng, 20, cfg.hidden_size, "bfloat16"))
    with pytest.raises(ValueError, match="router_logits"):
        layer(x)
    L = rng.standard_normal((20, cfg.num_total_experts)).astype(np.float32)
    y = layer(x, router_logits=cp.asarray(L))
    ref, _ = layer.reference(x, router_logits=L)
    assert relative_error(y.get(), ref) <= TOL["bfloat16"]


def test_bench_calibrates_moepp_7b_without_a_correction_bias(rng):
    # The preset has no correction bias; the benchmark workload gives it one (docs/spec.md), and
    # the calibration routes through the layer's own options (drop_zero, normalization).
    from zeromoe_cupy import bench
    cfg = zm.MoEConfig.preset("moe++-7b", hidden_size=64, intermediate_size=32,
                              dtype="float32")
    layer = zm.ZeroExpertMoE(cfg, device="cpu", seed=2)
    assert layer.e_score_correction_bias is None
    offset, share = bench.calibrate_zero_bias(layer, 4 / 3, n_tokens=1024)
    assert abs(share - 4 / 3) < 0.05
    bias = layer.e_score_correction_bias
    np.testing.assert_array_equal(bias[:cfg.num_experts], 0)
    np.testing.assert_array_equal(bias[cfg.num_experts:], np.float32(offset))
    x = random_x(rng, 30, 64, "float32")
    prev = prev_logits(rng, cfg, 30)
    ref, _ = layer.reference(x, prev_router_logits=prev)
    assert relative_error(layer(x, prev_router_logits=prev), ref) <= TOL["float32"]


@pytest.mark.gpu
def test_graphed_layer_with_moepp_options(rng):
    # drop_zero, input scaling, the two-layer router and the normalization replay as the
    # eager layer computes them; a gating-residual layer is graphed with the caller's logits.
    import cupy as cp
    cfg = zm.MoEConfig(**{**BASE, "renormalize": "drop_zero", "expert_input_scale": 2.0,
                          "router_hidden_size": 96, "router_logits_norm_std": 1.0,
                          "dtype": "bfloat16"})
    w = {k: cp.asarray(v) for k, v in random_layer_weights(rng, cfg).items()}
    layer = zm.ZeroExpertMoE.from_weights(cfg, **w)
    g = layer.graphed(max_tokens=16)
    for T in (1, 5, 16):
        x = cp.asarray(random_x(rng, T, cfg.hidden_size, "bfloat16"))
        ref, _ = layer.reference(x)
        assert relative_error(g(x).get(), ref) <= TOL["bfloat16"]
    res_cfg = dataclasses.replace(cfg, gating_residual=True)
    w = {k: cp.asarray(v) for k, v in random_layer_weights(rng, res_cfg).items()}
    res = zm.ZeroExpertMoE.from_weights(res_cfg, **w)
    with pytest.raises(ValueError, match="router_logits=True"):
        res.graphed(max_tokens=8)
    g = res.graphed(max_tokens=8, router_logits=True)
    x = cp.asarray(random_x(rng, 6, cfg.hidden_size, "bfloat16"))
    prev = cp.asarray(prev_logits(rng, res_cfg, 6))
    y, L = res(x, prev_router_logits=prev, return_router_logits=True)
    ref, _ = res.reference(x, prev_router_logits=prev.get())
    assert relative_error(g(x, router_logits=L).get(), ref) <= TOL["bfloat16"]


def test_save_load_pickle_keep_the_option_weights(rng, tmp_path):
    import copy
    import pickle
    cfg = zm.MoEConfig(**{**BASE, **OPTIONS["all"], "dtype": "float32"})
    w = random_layer_weights(rng, cfg)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **w)
    bare = zm.ZeroExpertMoE.from_weights(
        cfg, router_weight=None, **{k: v for k, v in w.items()
                                    if k not in ("router_weight", "router_hidden_weight",
                                                 "gate_map")})
    x = random_x(rng, 9, cfg.hidden_size, "float32")
    prev = prev_logits(rng, cfg, 9)
    y, L = layer(x, prev_router_logits=prev, return_router_logits=True)
    layer.save(tmp_path / "layer.safetensors")
    bare.save(tmp_path / "bare.safetensors")
    for other in (zm.ZeroExpertMoE.load(tmp_path / "layer.safetensors", device="cpu"),
                  pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert other.config == cfg
        np.testing.assert_array_equal(other.gate_map, layer.gate_map)
        np.testing.assert_array_equal(other.router_hidden_weight, layer.router_hidden_weight)
        np.testing.assert_array_equal(other(x, prev_router_logits=prev), y)
    for other in (zm.ZeroExpertMoE.load(tmp_path / "bare.safetensors", device="cpu"),
                  pickle.loads(pickle.dumps(bare))):
        assert other.router_weight is None
        np.testing.assert_array_equal(other(x, router_logits=L), bare(x, router_logits=L))


def test_quantized_layer_keeps_the_moepp_router(rng):
    # quantize("fp8") copies the router (two layers, gate_map) and keeps the options: the fp8
    # layer matches its own float64 evaluation (docs/spec.md "FP8 experts").
    cfg = zm.MoEConfig(**{**BASE, **OPTIONS["all"], "hidden_size": 128, "intermediate_size": 128,
                          "dtype": "bfloat16"})
    layer = zm.ZeroExpertMoE.from_weights(cfg, **random_layer_weights(rng, cfg))
    q = layer.quantize("fp8")
    for name in ("router_weight", "router_hidden_weight", "gate_map"):
        assert getattr(q, name) is not getattr(layer, name)
        np.testing.assert_array_equal(getattr(q, name), getattr(layer, name))
    x = random_x(rng, 20, 128, "bfloat16")
    prev = prev_logits(rng, cfg, 20)
    ref, _ = q.reference(x, prev_router_logits=prev)
    assert relative_error(q(x, prev_router_logits=prev), ref) <= 5e-3
