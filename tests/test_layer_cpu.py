"""The layer on NumPy arrays against the float64 reference, over a table of cases."""
import ml_dtypes
import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy import ops
from zeromoe_cupy.reference import relative_error

from conftest import TOL
from helpers import random_layer_weights, random_x, separated_rows

BASE = dict(hidden_size=64, intermediate_size=32, num_experts=6, num_zero_experts=3, top_k=3)

# name: (config overrides, T, extra: bias_scale / router_bias / logits / force)
CASES = {
    "identity": (dict(), 17, {}),
    "zero": (dict(zero_expert_type="zero"), 17, {}),
    "constant": (dict(zero_expert_type="constant"), 17, {}),
    "mixed": (dict(zero_expert_type=("constant", "identity", "zero")), 23, {}),
    "sigmoid": (dict(scoring_func="sigmoid"), 17, {}),
    "renormalize_rsf": (dict(renormalize=True, routed_scaling_factor=2.5), 17, {}),
    "correction_bias": (dict(use_correction_bias=True), 17, {"bias_scale": 0.05}),
    "grouped": (dict(num_expert_group=3, topk_group=2, top_k=4), 19, {}),
    "grouped_bias_sigmoid": (dict(num_expert_group=3, topk_group=2, scoring_func="sigmoid",
                                  use_correction_bias=True), 19, {"bias_scale": 0.1}),
    "router_bias": (dict(), 9, {"router_bias": True}),
    "logits_given": (dict(), 11, {"logits": True}),
    "t0": (dict(), 0, {}),
    "t1": (dict(), 1, {}),
    "h7": (dict(hidden_size=7), 9, {}),
    "h257": (dict(hidden_size=257), 5, {}),
    "k_all": (dict(top_k=9, zero_expert_type=("identity", "zero", "constant")), 6, {}),
    "no_zero_experts": (dict(num_zero_experts=0), 9, {}),
    "all_to_zero_experts": (dict(use_correction_bias=True), 13, {"force": "zero"}),
    "all_to_one_expert": (dict(top_k=1, use_correction_bias=True), 13, {"force": "one"}),
}
DTYPES = ["float32", "float16", "bfloat16"]


def build(case, dtype, rng):
    override, T, extra = CASES[case]
    cfg = zm.MoEConfig(**{**BASE, **override, "dtype": dtype})
    w = random_layer_weights(rng, cfg, bias_scale=extra.get("bias_scale", 0.0),
                             router_bias=extra.get("router_bias", False))
    force = extra.get("force")
    if force == "zero":
        w["e_score_correction_bias"][cfg.num_experts:] += 10.0
    elif force == "one":
        w["e_score_correction_bias"][2] += 10.0
    layer = zm.ZeroExpertMoE.from_weights(cfg, **w)
    x = random_x(rng, T, cfg.hidden_size, dtype)
    logits = None
    if extra.get("logits"):
        logits = rng.standard_normal((T, cfg.num_total_experts)).astype(np.float32)
    return cfg, layer, x, logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_reference(case, dtype, rng):
    cfg, layer, x, logits = build(case, dtype, rng)
    x_before = x.copy()
    y = layer(x, router_logits=logits)
    assert isinstance(y, np.ndarray) and y.dtype == x.dtype and y.shape == x.shape
    ref, ref_routing = layer.reference(x, router_logits=logits)
    assert relative_error(y, ref) <= TOL[dtype]
    np.testing.assert_array_equal(x, x_before)  # inputs are never modified

    r = layer.route(x, router_logits=logits)
    assert r.topk_ids.dtype == np.int32 and r.topk_weights.dtype == np.float32
    assert r.expert_counts.dtype == np.int32 and r.expert_counts.shape == (cfg.num_total_experts,)
    assert ((r.topk_ids >= 0) & (r.topk_ids < cfg.num_total_experts)).all()
    np.testing.assert_array_equal(
        r.expert_counts, np.bincount(r.topk_ids.ravel(), minlength=cfg.num_total_experts))
    if x.shape[0]:
        L = logits if logits is not None else layer._logits(x)
        ok = separated_rows(L.astype(np.float64), dict(
            top_k=cfg.top_k, scoring_func=cfg.scoring_func, renormalize=cfg.renormalize,
            num_expert_group=cfg.num_expert_group, topk_group=cfg.topk_group),
            bias=None if layer.e_score_correction_bias is None
            else layer.e_score_correction_bias.astype(np.float64))
        assert ok.mean() > 0.5  # most rows are clearly separated on random data
        np.testing.assert_array_equal(r.topk_ids[ok], ref_routing.topk_ids[ok])
        np.testing.assert_allclose(r.topk_weights[ok], ref_routing.topk_weights[ok],
                                   rtol=1e-5, atol=1e-7)


def test_forced_routings_do_what_they_say(rng):
    _, layer, x, _ = build("all_to_zero_experts", "float32", rng)
    assert (layer.route(x).topk_ids >= layer.config.num_experts).all()
    _, layer, x, _ = build("all_to_one_expert", "float32", rng)
    assert (layer.route(x).topk_ids == 2).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_routing_reuse_gives_the_same_output(dtype, rng):
    _, layer, x, _ = build("mixed", dtype, rng)
    r = layer.route(x)
    np.testing.assert_array_equal(layer(x, routing=r), layer(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_equals_unchunked(dtype, rng):
    cfg, layer, x, _ = build("mixed", dtype, rng)
    # NumPy's BLAS may block a product differently for fewer rows, so chunks agree to
    # rounding (bitwise with deterministic=True: the next test).
    whole = layer(x)
    layer.max_chunk_tokens = 5
    assert relative_error(layer(x), whole) <= TOL[dtype] / 10
    assert relative_error(layer(x, routing=layer.route(x)), whole) <= TOL[dtype] / 10


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_layer_gives_the_same_bits_in_any_chunk(dtype, rng):
    cfg = zm.MoEConfig(**{**BASE, "dtype": dtype, "use_correction_bias": True})
    w = random_layer_weights(rng, cfg, bias_scale=0.02, router_bias=True)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **w, deterministic=True)
    assert layer.expert_strategy == "fixed"
    x = random_x(rng, 40, cfg.hidden_size, dtype)
    whole = layer(x)
    ref, _ = layer.reference(x)
    assert relative_error(whole, ref) <= TOL[dtype]
    for chunk in (17, 5, 1):
        layer.max_chunk_tokens = chunk
        np.testing.assert_array_equal(layer(x).view(np.uint8), whole.view(np.uint8))
    # a token alone gives its row's bits
    np.testing.assert_array_equal(layer(x[11:12]).view(np.uint8), whole[11:12].view(np.uint8))


def test_fixed_order_matmul_rows_do_not_depend_on_the_batch(rng):
    from zeromoe_cupy._arrays import fixed_order_matmul
    a = rng.standard_normal((70, 33)).astype(np.float32)
    b = rng.standard_normal((33, 9)).astype(np.float32)
    full = fixed_order_matmul(a, b)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert full.dtype == np.float32
    assert np.abs(full - exact).max() <= 1e-6 * np.abs(exact).max()
    for s, t in ((0, 1), (5, 6), (3, 40), (64, 70)):
        np.testing.assert_array_equal(fixed_order_matmul(a[s:t], b), full[s:t])


def test_random_init_layer_runs_on_cpu_and_scales_weights(rng):
    cfg = zm.MoEConfig.preset("tiny")
    layer = zm.ZeroExpertMoE(cfg, seed=3, device="cpu")
    assert layer.device == "cpu"
    assert abs(float(np.std(layer.w13.astype(np.float32))) - cfg.hidden_size ** -0.5) < 0.01
    assert abs(float(np.std(layer.w2.astype(np.float32))) - cfg.intermediate_size ** -0.5) < 0.01
    assert not layer.e_score_correction_bias.any()
    x = random_x(rng, 8, cfg.hidden_size, cfg.dtype)
    ref, _ = layer.reference(x)
    assert relative_error(layer(x), ref) <= TOL[cfg.dtype]
    same = zm.ZeroExpertMoE(cfg, seed=3, device="cpu")
    np.testing.assert_array_equal(same.w13, layer.w13)


def test_moepp_preset_shapes_on_cpu(rng):
    cfg = zm.MoEConfig.preset("moe++-7b", hidden_size=32, intermediate_size=16)
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cpu")
    assert layer.const_vec.shape == (4, 32) and layer.const_gate.shape == (4, 2, 32)
    x = random_x(rng, 40, 32, cfg.dtype)
    ref, _ = layer.reference(x)
    assert relative_error(layer(x), ref) <= TOL[cfg.dtype]


# --- router logits in the layer's dtypes --------------------------------------------------------
@pytest.mark.parametrize("logit_dtype", ["bfloat16", "float16"])
def test_low_precision_router_logits_are_used_in_fp32(logit_dtype, rng):
    from zeromoe_cupy._arrays import np_dtype
    cfg, layer, x, _ = build("mixed", "bfloat16", rng)
    L = rng.standard_normal((x.shape[0], cfg.num_total_experts)).astype(np.float32)
    L_low = L.astype(np_dtype(logit_dtype))
    L32 = L_low.astype(np.float32)  # the values the layer must route on
    y = layer(x, router_logits=L_low)
    ref, ref_routing = layer.reference(x, router_logits=L32)
    assert relative_error(y, ref) <= TOL["bfloat16"]
    r = layer.route(x, router_logits=L_low)
    r32 = layer.route(x, router_logits=L32)
    np.testing.assert_array_equal(r.topk_ids, r32.topk_ids)
    np.testing.assert_array_equal(r.topk_weights, r32.topk_weights)
    o = zm.ops.route(L_low, cfg.top_k)
    np.testing.assert_array_equal(o.topk_ids, zm.ops.route(L32, cfg.top_k).topk_ids)


# --- caller-supplied routing -------------------------------------------------------------------
def test_caller_routing_in_other_dtypes_and_with_wrong_counts(rng):
    cfg, layer, x, _ = build("mixed", "float32", rng)
    N = cfg.num_total_experts
    ids = np.stack([rng.permutation(N)[:cfg.top_k] for _ in range(x.shape[0])])
    w = rng.random(ids.shape) + 0.1
    ref, _ = layer.reference(x, routing=(ids, w))
    for counts in (np.bincount(ids.ravel(), minlength=N).astype(np.int32),
                   np.zeros(N, np.int32), np.full(N, 10**6, np.int32), None):
        r = zm.RoutingResult(ids.astype(np.int64), w.astype(np.float64), counts)
        before = [a.copy() for a in (r.topk_ids, r.topk_weights)]
        assert relative_error(layer(x, routing=r), ref) <= TOL["float32"]
        for a, b in zip(r[:2], before):
            np.testing.assert_array_equal(a, b)


# --- devices -----------------------------------------------------------------------------------
def test_gpu_available_is_public_and_auto_follows_it():
    assert isinstance(zm.gpu_available(), bool)
    assert "gpu_available" in zm.__all__
    cfg = zm.MoEConfig(**{**BASE, "dtype": "float32"})
    want = "cuda" if zm.gpu_available() else "cpu"
    assert zm.ZeroExpertMoE(cfg).device == want
    assert zm.ZeroExpertMoE(cfg, device="auto").device == want
    assert zm.ZeroExpertMoE(cfg, device="cpu").device == "cpu"


@pytest.mark.parametrize("device", [None, "cpu", "auto"])
def test_from_weights_takes_a_device(device, rng):
    cfg = zm.MoEConfig(**{**BASE, "dtype": "float32"})
    w = random_layer_weights(rng, cfg)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **w, device=device)
    want = "cuda" if device == "auto" and zm.gpu_available() else "cpu"
    assert layer.device == want
    x = random_x(rng, 9, cfg.hidden_size, "float32")
    if want == "cuda":
        import cupy as cp
        x = cp.asarray(x)
    ref, _ = layer.reference(x)
    y = layer(x)
    assert relative_error(y.get() if want == "cuda" else y, ref) <= TOL["float32"]


def test_assigned_weights_are_used_and_in_place_writes_stay(rng):
    cfg = zm.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, num_zero_experts=2,
                       top_k=2, dtype="float32")
    layer = zm.ZeroExpertMoE(cfg, seed=1, device="cpu")
    new = random_layer_weights(rng, cfg, router_bias=True)
    x = random_x(rng, 9, 16, "float32")
    for k in ("router_weight", "router_bias", "w13", "w2"):
        setattr(layer, k, new[k])
        assert getattr(layer, k) is new[k]  # kept as given: later writes reach the layer
    new["w2"][1:] *= -2
    ref = zm.ZeroExpertMoE.from_weights(cfg, **new).reference(x)[0]
    assert relative_error(layer(x), ref) < TOL["float32"]
    layer.router_bias = None  # optional: may go
    assert layer.router_bias is None


def test_dtype_is_the_inputs_dtype_also_for_fp8(rng):
    for dt in ("float32", "bfloat16", "float16"):
        cfg = zm.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4,
                           num_zero_experts=2, top_k=2, dtype=dt)
        layer = zm.ZeroExpertMoE(cfg, seed=0, device="cpu")
        assert layer.dtype == {"float32": np.float32, "float16": np.float16,
                               "bfloat16": ml_dtypes.bfloat16}[dt]
        for lay in (layer, layer.quantize("fp8")):
            x = random_x(rng, 3, 16, "float32").astype(lay.dtype)
            assert lay(x).dtype == lay.dtype
        with pytest.raises(AttributeError):
            layer.dtype = np.float32


def test_numpy_weights_are_copies(rng):
    cfg = zm.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, num_zero_experts=2,
                       top_k=2, dtype="float32", zero_expert_type=("constant", "zero"))
    layer = zm.ZeroExpertMoE(cfg, seed=2, device="cpu")
    before = {k: v.copy() for k, v in layer.numpy_weights().items() if v is not None}
    for k, v in layer.numpy_weights().items():
        if v is not None:
            v[...] = 7
            np.testing.assert_array_equal(getattr(layer, k), before[k])


def test_rank_layer_takes_its_slice_of_experts_on_assignment(rng):
    cfg = zm.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, num_zero_experts=2,
                       top_k=2, dtype="float32")
    g = zm.parallel.local_groups(2)[1]
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cpu", group=g)
    w13 = rng.standard_normal((2, 16, 16)).astype(np.float32)  # experts 2, 3 of the layer
    layer.w13 = w13
    assert layer.w13 is w13
    with pytest.raises(ValueError, match=r"w13: expected shape \(2, 16, 16\)"):
        layer.w13 = rng.standard_normal((4, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_nan_and_inf_rows_stay_in_their_rows_without_warnings(dtype, fp8, rng):
    # The suite turns the package's warnings into errors: router, experts, combine and the
    # float64 reference must take NaN / Inf rows quietly, and leave the other rows finite.
    cfg = zm.MoEConfig.preset("tiny", dtype=dtype, zero_expert_type="constant")
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cpu")
    if fp8:
        layer = layer.quantize("fp8")
    x = rng.standard_normal((4, cfg.hidden_size)).astype(np.float32)
    x[1, 3], x[2, 5], x[3, 0] = np.nan, np.inf, -np.inf
    x = x.astype(layer.dtype)
    y = np.asarray(layer(x), np.float64)
    ref, _ = layer.reference(x)
    assert np.isfinite(y[0]).all() and np.isfinite(ref[0]).all()
    assert not np.isfinite(y[1:]).all(axis=1).any()


def test_reference_takes_given_logits_as_fp32_like_the_layer(rng):
    # float64 logits that differ only below fp32's resolution, and beyond fp32's range: the
    # layer uses them as fp32 values (docs/spec.md), and so does its oracle, quietly.
    cfg = zm.MoEConfig.preset("tiny")
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cpu")
    x = rng.standard_normal((3, cfg.hidden_size)).astype(np.float32)
    logits = np.full((3, cfg.num_total_experts), -1.0)
    logits[:, 0], logits[:, 5], logits[:, 3] = 1.0, 1.0 + 1e-12, 1.0 - 1e-12
    logits[2] = rng.standard_normal(cfg.num_total_experts) * 1e50
    y = layer(x, router_logits=logits)
    ref, routing = layer.reference(x, router_logits=logits)
    np.testing.assert_array_equal(layer.route(x, router_logits=logits).topk_ids[:2],
                                  routing.topk_ids[:2])
    assert relative_error(y[:2], ref[:2]) <= TOL["float32"]
    assert np.isnan(y[2]).all() and np.isnan(ref[2]).all()  # +-inf logits: a NaN row


def test_big_endian_x_gives_the_native_result(rng):
    """x in the config's dtype but the other byte order (e.g. read from a big-endian file):
    used as its values, the same bits as the native array; x itself is not modified."""
    cfg = zm.MoEConfig(hidden_size=64, intermediate_size=32, num_experts=4, num_zero_experts=2,
                       top_k=2, dtype="float32")
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cpu")
    x = random_x(rng, 5, 64, "float32")
    xb = x.astype(">f4")
    before = xb.copy()
    np.testing.assert_array_equal(layer(xb), layer(x))
    np.testing.assert_array_equal(xb, before)
    assert xb.dtype == np.dtype(">f4")
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        layer(x.astype(">f8"))


def test_arrays_of_the_other_byte_order_work_everywhere(rng):
    """Every array argument, not only the layer's x: the ops, the routing and the weights of
    from_weights take ">f4" / ">i4" arrays as their values (the other byte order on this
    little-endian machine), with the native arrays' results; the arrays are not modified."""
    cfg = zm.MoEConfig(hidden_size=64, intermediate_size=32, num_experts=4, num_zero_experts=2,
                       top_k=2, dtype="float32")
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cpu")
    x = random_x(rng, 5, 64, "float32")
    big = lambda a: a.astype(a.dtype.newbyteorder(">"))  # noqa: E731
    xb = big(x)
    before = xb.copy()
    L = ops.router_logits(x, layer.router_weight)
    np.testing.assert_array_equal(ops.router_logits(xb, big(layer.router_weight)), L)
    r = ops.route(L, 2)
    rb = ops.route(big(L), 2)
    np.testing.assert_array_equal(rb.topk_ids, r.topk_ids)
    np.testing.assert_array_equal(rb.topk_weights, r.topk_weights)
    out = ops.expert_mlp(x, r.topk_ids, layer.w13, layer.w2)
    outb = ops.expert_mlp(xb, big(r.topk_ids), big(layer.w13), big(layer.w2))
    np.testing.assert_array_equal(outb.rows, out.rows)
    y = ops.combine(x, r.topk_ids, r.topk_weights, 4, "identity", out)
    np.testing.assert_array_equal(
        ops.combine(xb, big(r.topk_ids), big(r.topk_weights), 4, "identity", outb), y)
    weights = dict(router_weight=layer.router_weight, w13=layer.w13, w2=layer.w2,
                   e_score_correction_bias=layer.e_score_correction_bias)
    again = zm.ZeroExpertMoE.from_weights(
        cfg, **{k: None if v is None else big(v) for k, v in weights.items()})
    np.testing.assert_array_equal(again(x), layer(x))
    np.testing.assert_array_equal(xb, before)
