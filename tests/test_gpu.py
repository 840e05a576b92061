"""GPU paths against the float64 reference (marker gpu: deselected without a GPU)."""
import dataclasses

import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy import ops, reference
from zeromoe_cupy.reference import relative_error

from conftest import TOL
from helpers import one_lane_wins_logits, random_layer_weights, random_x, separated_rows

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")

DTYPES = ["float32", "float16", "bfloat16"]

# --- routing kernel ---------------------------------------------------------------------------
ROUTE_SHAPES = {
    # name: (N, K, groups, topk_group)
    "longcat": (768, 12, None, None),
    "deepseek": (256, 8, 8, 4),
    "moepp": (20, 2, None, None),
    "max": (1024, 32, None, None),
}


@pytest.mark.parametrize("T", [0, 1, 7, 1000, 65536])
@pytest.mark.parametrize("shape", sorted(ROUTE_SHAPES))
@pytest.mark.parametrize("scoring,bias,renorm", [("softmax", True, False),
                                                 ("sigmoid", True, True),
                                                 ("softmax", False, True),
                                                 ("sigmoid", False, False)])
def test_route_kernel_matches_reference(T, shape, scoring, bias, renorm, rng):
    N, K, G, TG = ROUTE_SHAPES[shape]
    if T == 65536 and (shape != "longcat" or not bias):
        pytest.skip("the largest T only on one representative configuration")
    logits_h = rng.standard_normal((T, N)).astype(np.float32)
    bias_h = (rng.standard_normal(N) * 0.02).astype(np.float32) if bias else None
    cfg_like = dict(top_k=K, scoring_func=scoring, renormalize=renorm, num_expert_group=G,
                    topk_group=TG)
    bias64 = None if bias_h is None else bias_h.astype(np.float64)
    if 0 < T <= 1000:  # rows whose top K+1 scores nearly tie are drawn again (rare: about one
        for _ in range(10):  # in a thousand rows at N = 1024): never a row-less comparison
            close = ~separated_rows(logits_h.astype(np.float64), cfg_like, bias=bias64)
            if not close.any():
                break
            logits_h[close] = rng.standard_normal((int(close.sum()), N)).astype(np.float32)
    logits = cp.asarray(logits_h)
    bias_d = None if bias_h is None else cp.asarray(bias_h)
    r = ops.route(logits, K, scoring_func=scoring, e_score_correction_bias=bias_d,
                  renormalize=renorm, routed_scaling_factor=2.0, num_expert_group=G,
                  topk_group=TG)
    np.testing.assert_array_equal(logits.get(), logits_h)
    ids, w, counts = r.topk_ids.get(), r.topk_weights.get(), r.expert_counts.get()
    assert ids.shape == (T, K) and w.shape == (T, K)
    np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=N))
    if T == 0:
        return
    sample = np.arange(T) if T <= 1000 else rng.choice(T, 500, replace=False)
    ref = reference.route(logits_h[sample], K, scoring, bias_h, renorm, 2.0, G, TG)
    ok = separated_rows(logits_h[sample].astype(np.float64), cfg_like, bias=bias64)
    assert ok.mean() > 0.5
    np.testing.assert_array_equal(ids[sample][ok], ref.topk_ids[ok])
    np.testing.assert_allclose(w[sample][ok], ref.topk_weights[ok], rtol=1e-6, atol=1e-9)


def test_route_kernel_collapsed_router_counts():
    # Every token prefers the same K experts (a collapsed router): the per-block counts meet
    # on a few counters; with 20000 tokens the grid loops over the tokens.
    T, N, K = 20000, 768, 12
    rng = np.random.default_rng(4)
    logits_h = rng.standard_normal((T, N)).astype(np.float32)
    hot = rng.choice(N, K, replace=False)
    logits_h[:, hot] += 20.0
    r = ops.route(cp.asarray(logits_h), K)
    ids = r.topk_ids.get()
    assert (np.sort(ids, axis=1) == np.sort(hot)).all()
    expected = np.zeros(N, np.int64)
    expected[hot] = T
    np.testing.assert_array_equal(r.expert_counts.get(), expected)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_kernel_misaligned_inputs(scoring):
    # Logits and bias views that do not start on 16 bytes (the kernel's vector loads): the
    # router copies them and gives the reference's answer.
    T, N, K = 37, 256, 8
    rng = np.random.default_rng(6)
    big = cp.asarray(rng.standard_normal((T * N + 1,)).astype(np.float32))
    logits = big[1:].reshape(T, N)
    bias_big = cp.asarray((rng.standard_normal(N + 1) * 0.02).astype(np.float32))
    bias = bias_big[1:]
    assert logits.data.ptr % 16 and bias.data.ptr % 16
    r = ops.route(logits, K, scoring_func=scoring, e_score_correction_bias=bias,
                  num_expert_group=8, topk_group=4)
    ref = reference.route(logits.get(), K, scoring, bias.get(), False, 1.0, 8, 4)
    np.testing.assert_array_equal(r.topk_ids.get(), ref.topk_ids)
    np.testing.assert_allclose(r.topk_weights.get(), ref.topk_weights, rtol=1e-6)


def test_route_kernel_nan_rows():
    logits = cp.asarray(np.random.default_rng(0).standard_normal((4, 768)).astype(np.float32))
    logits[0] = cp.nan
    logits[1, 3] = cp.nan
    logits[2, :100] = cp.nan
    for scoring in ("softmax", "sigmoid"):
        r = ops.route(logits, 12, scoring_func=scoring)
        ids = r.topk_ids.get()
        assert ((ids >= 0) & (ids < 768)).all()
        ref = reference.route(logits.get(), 12, scoring)
        np.testing.assert_array_equal(ids[:1], ref.topk_ids[:1])


# --- zero experts and combine ------------------------------------------------------------------
@pytest.mark.parametrize("H", [1, 7, 200, 256, 257, 300, 768, 1000, 4096, 6144, 7168])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("types", ["identity", "zero", "constant", "mixed"])
def test_zero_expert_output_every_H(H, dtype, types, rng):
    from zeromoe_cupy._arrays import np_dtype
    T, K, E, Z = 7, 12, 6, 4
    zt = ("constant", "identity", "zero", "identity") if types == "mixed" else types
    # Real slots carry weight in the layer but not in the zero share: zero them in the oracle.
    x_h = random_x(rng, T, H, dtype)
    ids_h = rng.integers(0, E + Z, (T, K)).astype(np.int32)
    w_h = rng.random((T, K)).astype(np.float32) * 2
    cv = rng.standard_normal((Z, H)).astype(np.float32).astype(np_dtype(dtype))
    cg = (rng.standard_normal((Z, 2, H)) * H ** -0.5).astype(np.float32).astype(np_dtype(dtype))
    args = [cp.asarray(a) for a in (x_h, ids_h, w_h, cv, cg)]
    before = [a.copy() for a in args]
    out = ops.zero_expert_output(args[0], args[1], args[2], E, zt, const_vec=args[3],
                                 const_gate=args[4], num_zero_experts=Z)
    for a, b in zip(args, before):
        assert bytes(a.get().tobytes()) == bytes(b.get().tobytes())
    ref, _ = reference.forward(x_h, None, np.zeros((E, 2, H)), np.zeros((E, H, 1)), top_k=K,
                               num_experts=E, zero_expert_type=zt, const_vec=cv,
                               const_gate=cg, routing=(ids_h, w_h * (ids_h >= E)))
    assert relative_error(out.get(), ref) <= TOL[dtype] or np.linalg.norm(ref) == 0
    if types == "zero":
        assert not out.get().astype(np.float32).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_expert_output_misaligned_view(dtype, rng):
    T, H, K, E = 9, 256, 4, 3
    big = cp.asarray(random_x(rng, T, H + 1, dtype))
    x = big[:, 1:]  # starts one element in: no 16-byte access possible
    ids = cp.asarray(rng.integers(0, E + 2, (T, K)).astype(np.int32))
    w = cp.asarray(rng.random((T, K)).astype(np.float32))
    out = ops.zero_expert_output(x, ids, w, E, ("identity", "zero"))
    ref, _ = reference.forward(x.get(), None, np.zeros((E, 2, H)), np.zeros((E, H, 1)),
                               top_k=K, num_experts=E, zero_expert_type=("identity", "zero"),
                               routing=(ids.get(), w.get() * (ids.get() >= E)))
    assert relative_error(out.get(), ref) <= TOL[dtype]


# --- full layer ---------------------------------------------------------------------------------
LAYER_CASES = {
    "tiny": (zm.MoEConfig.preset("tiny"), 33),
    "moepp": (zm.MoEConfig.preset("moe++-7b", hidden_size=512, intermediate_size=256), 64),
    "grouped": (zm.MoEConfig(hidden_size=128, intermediate_size=64, num_experts=24,
                             num_zero_experts=8, top_k=6, num_expert_group=8, topk_group=4,
                             scoring_func="sigmoid", use_correction_bias=True,
                             renormalize=True, routed_scaling_factor=2.5), 50),
    "odd_H": (zm.MoEConfig(hidden_size=257, intermediate_size=40, num_experts=5,
                           num_zero_experts=3, top_k=3,
                           zero_expert_type=("identity", "zero", "constant")), 21),
    "t1": (zm.MoEConfig.preset("tiny"), 1),
}


@pytest.mark.parametrize("strategy", ["auto", "pairs", "grouped", "padded", "fixed",
                                      "syncfree", "capacity"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_gpu_matches_reference(case, dtype, strategy, rng):
    cfg0, T = LAYER_CASES[case]
    cfg = dataclasses.replace(cfg0, dtype=dtype)
    w = random_layer_weights(rng, cfg, bias_scale=0.02)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **{k: cp.asarray(v) for k, v in w.items()})
    layer.expert_strategy = strategy
    x = cp.asarray(random_x(rng, T, cfg.hidden_size, dtype))
    x_before = x.copy()
    y = layer(x)
    assert isinstance(y, cp.ndarray) and y.dtype == x.dtype
    ref, _ = layer.reference(x)
    assert relative_error(y.get(), ref) <= TOL[dtype]
    cp.testing.assert_array_equal(x, x_before)
    # routing reuse and chunking give bitwise the same answer
    cp.testing.assert_array_equal(layer(x, routing=layer.route(x)), y)
    layer.max_chunk_tokens = 7
    chunked = layer(x)
    assert relative_error(chunked.get(), ref) <= TOL[dtype]


@pytest.mark.parametrize("strategy", ["auto", "pairs", "grouped", "padded", "fixed",
                                      "syncfree", "capacity"])
@pytest.mark.parametrize("force", ["zero", "one", "single_active"])
def test_layer_gpu_skewed_routing(force, strategy, rng):
    cfg = zm.MoEConfig(hidden_size=256, intermediate_size=128, num_experts=16,
                       num_zero_experts=8, top_k=4, use_correction_bias=True, dtype="bfloat16")
    w = random_layer_weights(rng, cfg)
    if force == "zero":
        w["e_score_correction_bias"][16:] += 10
    elif force == "one":
        w["e_score_correction_bias"][3] += 10
    else:  # every real slot to expert 5, the rest to zero experts
        w["e_score_correction_bias"][5] += 10
        w["e_score_correction_bias"][16:] += 5
    layer = zm.ZeroExpertMoE.from_weights(cfg, **{k: cp.asarray(v) for k, v in w.items()})
    layer.expert_strategy = strategy
    x = cp.asarray(random_x(rng, 300, 256, "bfloat16"))
    ref, _ = layer.reference(x)
    assert relative_error(layer(x).get(), ref) <= TOL["bfloat16"]


def test_longcat_layer_sampled_rows(rng):
    cfg = zm.MoEConfig.preset("longcat-flash")
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
    E = cfg.num_experts
    for T in (1, 128, 4096):
        x = cp.asarray(random_x(rng, T, cfg.hidden_size, cfg.dtype))
        r = layer.route(x)
        y = layer(x, routing=r)
        rows = np.sort(rng.choice(T, min(T, 16), replace=False))
        ids, wts = r.topk_ids.get()[rows], r.topk_weights.get()[rows]
        # Only the experts these rows use travel to the host; ids are renumbered to match.
        used = np.unique(ids[ids < E])
        remap = np.full(E + cfg.num_zero_experts, -1)
        remap[used] = np.arange(used.size)
        remap[E:] = used.size + np.arange(cfg.num_zero_experts)
        sub = cp.asarray(used)
        ref, _ = reference.forward(x.get()[rows], None, layer.w13[sub].get(),
                                   layer.w2[sub].get(), top_k=cfg.top_k,
                                   num_experts=used.size, routing=(remap[ids], wts))
        assert relative_error(y.get()[rows], ref) <= TOL[cfg.dtype]


@pytest.mark.parametrize("order", ["descending", "ascending"])
def test_route_kernel_one_lane_wins_many_times(order):
    # Experts 0-3, 128-131, ... (one lane's) hold the top scores: that lane gives more
    # winners than it caches and must rescan.
    N, K = 768, 12
    logits = one_lane_wins_logits(64, N, order)
    r = ops.route(cp.asarray(logits), K)
    ref = reference.route(logits, K, "softmax")
    np.testing.assert_array_equal(r.topk_ids.get(), ref.topk_ids)
    np.testing.assert_allclose(r.topk_weights.get(), ref.topk_weights, rtol=1e-6)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_kernel_ties_go_to_lower_ids(scoring):
    # Equal scores in many lanes at once (the arg-max's tie path): order follows the ids.
    N, K = 768, 12
    e = np.arange(N)
    logits = np.stack([np.zeros(N), e % 7, -(e % 5), (e % 64 == 3) * 1.0]).astype(np.float32)
    r = ops.route(cp.asarray(logits), K, scoring_func=scoring)
    ref = reference.route(logits, K, scoring)
    np.testing.assert_array_equal(r.topk_ids.get(), ref.topk_ids)
    np.testing.assert_allclose(r.topk_weights.get(), ref.topk_weights, rtol=1e-6)


@pytest.mark.parametrize("T", [0, 1, 7, 128, 4096])
@pytest.mark.parametrize("K", [1, 2, 8, 12])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_expert_output_tokens_and_slots(T, K, dtype, rng):
    # Renormalized, rsf-scaled weights as the router gives them; a mixed type table.
    from zeromoe_cupy._arrays import np_dtype
    H, E, Z = 300, 5, 4
    zt = ("constant", "identity", "zero", "identity")
    x_h = random_x(rng, T, H, dtype)
    ids_h = rng.integers(0, E + Z, (T, K)).astype(np.int32)
    w_h = rng.random((T, K)).astype(np.float32) + 0.1
    w_h = (w_h / w_h.sum(1, keepdims=True) * 2.5).astype(np.float32)
    cv = rng.standard_normal((Z, H)).astype(np.float32).astype(np_dtype(dtype))
    cg = (rng.standard_normal((Z, 2, H)) * H ** -0.5).astype(np.float32).astype(np_dtype(dtype))
    args = [cp.asarray(a) for a in (x_h, ids_h, w_h, cv, cg)]
    before = [a.get().tobytes() for a in args]
    out = ops.zero_expert_output(args[0], args[1], args[2], E, zt, const_vec=args[3],
                                 const_gate=args[4], num_zero_experts=Z)
    assert out.shape == (T, H) and out.dtype == x_h.dtype
    assert [a.get().tobytes() for a in args] == before
    if T == 0:
        return
    ref, _ = reference.forward(x_h, None, np.zeros((E, 2, H)), np.zeros((E, H, 1)), top_k=K,
                               num_experts=E, zero_expert_type=zt, const_vec=cv,
                               const_gate=cg, routing=(ids_h, w_h * (ids_h >= E)))
    if np.linalg.norm(ref):
        assert relative_error(out.get(), ref) <= TOL[dtype]
    else:  # every slot of every token went to a real or a "zero" expert
        assert not out.get().astype(np.float32).any()


def test_router_logits_from_bf16_parts_match_fp32_accuracy(rng):
    # router_gemm="bf16x3": bf16 tensor-core GEMMs on a three-way split of Wr, the leading
    # part in K-chunks, summed in fp32. Its error must stay at the fp32 GEMM's level.
    from zeromoe_cupy.layer import BF16X3_MIN_TOKENS
    from zeromoe_cupy.routing import router_logits, split_bf16
    T, H, N = BF16X3_MIN_TOKENS, 6144, 768
    x = cp.asarray(random_x(rng, T, H, "bfloat16"))
    wr = cp.asarray((rng.standard_normal((N, H)) * H ** -0.5).astype(np.float32))
    exact = x.get().astype(np.float64) @ wr.get().astype(np.float64).T
    split = router_logits(x, wr, weight_parts=split_bf16(wr)).get()
    fp32 = router_logits(x, wr).get()
    err_split = np.abs(split - exact).max() / np.abs(exact).max()
    err_fp32 = np.abs(fp32 - exact).max() / np.abs(exact).max()
    # Measured on an H200: over 256 rows of 16384, fp32 3.2e-6, bf16x3 (512-wide chunks)
    # 6.2e-7, unchunked 7.9e-6; at 512 rows, fp32 5.0e-7, 1024-wide chunks 1.1e-6.
    print(f"max relative error: fp32 {err_fp32:.2e}, bf16x3 {err_split:.2e}")
    assert split.dtype == np.float32 and err_fp32 <= 5e-6, err_fp32
    assert err_split <= max(2 * err_fp32, 2.5e-6), (err_split, err_fp32)
    # a strided view of x: the same accuracy
    wide = cp.zeros((T, H + 8), x.dtype)
    wide[:, :H] = x
    strided = router_logits(wide[:, :H], wr, weight_parts=split_bf16(wr)).get()
    assert np.abs(strided - exact).max() / np.abs(exact).max() <= max(2 * err_fp32, 2.5e-6)
    # the layer uses it by default for bf16 and BF16X3_MIN_TOKENS tokens or more
    cfg = zm.MoEConfig(hidden_size=H, intermediate_size=64, num_experts=N - 8,
                       num_zero_experts=8, top_k=4)
    layer = zm.ZeroExpertMoE.from_weights(cfg, router_weight=wr,
                                          w13=cp.zeros((N - 8, 128, H), x.dtype),
                                          w2=cp.zeros((N - 8, H, 64), x.dtype))
    cp.testing.assert_array_equal(layer._logits(x), cp.asarray(split))
    assert layer._router_parts(BF16X3_MIN_TOKENS - 1) is None
    layer.router_gemm = "fp32"
    cp.testing.assert_array_equal(layer._logits(x), cp.asarray(fp32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 3, 8, 17, 32])
@pytest.mark.parametrize("layout", ["contiguous", "misaligned"])
@pytest.mark.parametrize("N", [96, 97])  # 97: the last block of the kernel's two rows is half full
def test_router_logits_for_few_tokens(T, dtype, layout, N, rng):
    # Up to ROUTER_GEMV_MAX_T tokens: one matrix-vector kernel, fp32 sums.
    from zeromoe_cupy.routing import ROUTER_GEMV_MAX_T, router_logits
    assert T <= ROUTER_GEMV_MAX_T
    H = 1000
    x = cp.asarray(random_x(rng, T, H + 1, dtype))
    x = x[:, 1:] if layout == "misaligned" else x[:, :H]
    wr = cp.asarray((rng.standard_normal((N, H)) * H ** -0.5).astype(np.float32))
    br = cp.asarray(rng.standard_normal(N).astype(np.float32))
    x_before = x.copy()
    out = router_logits(x, wr, br)
    exact = x.get().astype(np.float64) @ wr.get().astype(np.float64).T + br.get()
    assert out.shape == (T, N) and out.dtype == np.float32
    if T:
        assert np.abs(out.get() - exact).max() <= 2e-6 * np.abs(exact).max()
    cp.testing.assert_array_equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_logits_fixed_order_any_batch(dtype, rng):
    # fixed_order=True: the matrix-vector kernel at any T; a row has the same bits alone, in
    # any batch, and from a misaligned copy of x (scalar loads, same summation order).
    from zeromoe_cupy.routing import router_logits
    T, H, N = 37, 1000, 96
    big = cp.asarray(random_x(rng, T, H + 1, dtype))
    x, x_odd = cp.ascontiguousarray(big[:, 1:]), big[:, 1:]
    wr = cp.asarray((rng.standard_normal((N, H)) * H ** -0.5).astype(np.float32))
    br = cp.asarray(rng.standard_normal(N).astype(np.float32))
    out = router_logits(x, wr, br, fixed_order=True)
    exact = x.get().astype(np.float64) @ wr.get().astype(np.float64).T + br.get()
    assert np.abs(out.get() - exact).max() <= 2e-6 * np.abs(exact).max()
    cp.testing.assert_array_equal(router_logits(x_odd, wr, br, fixed_order=True), out)
    for s, t in ((0, 1), (3, 11), (20, 37)):
        cp.testing.assert_array_equal(router_logits(x[s:t], wr, br, fixed_order=True), out[s:t])


# --- caller-supplied routing and devices ----------------------------------------------------------
@pytest.mark.parametrize("strategy", ["auto", "pairs", "grouped", "padded", "fixed"])
@pytest.mark.parametrize("counts", ["right", "zeros", "huge", "negative", "none"])
def test_caller_routing_counts_are_never_trusted(counts, strategy, rng):
    # Counts that do not match the ids must not misplace rows (or reach memory out of bounds).
    cfg = zm.MoEConfig(hidden_size=256, intermediate_size=128, num_experts=16,
                       num_zero_experts=8, top_k=4, dtype="bfloat16")
    w = random_layer_weights(rng, cfg)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **{k: cp.asarray(v) for k, v in w.items()},
                                          expert_strategy=strategy)
    T, N = 300, cfg.num_total_experts
    ids = np.stack([rng.permutation(N)[:cfg.top_k] for _ in range(T)])
    wts = (rng.random(ids.shape) + 0.1).astype(np.float32)
    c = {"right": np.bincount(ids.ravel(), minlength=N), "zeros": np.zeros(N),
         "huge": np.full(N, 10**6), "negative": np.full(N, -5), "none": None}[counts]
    r = zm.RoutingResult(cp.asarray(ids.astype(np.int64)), cp.asarray(wts),
                         None if c is None else cp.asarray(c.astype(np.int32)))
    x = cp.asarray(random_x(rng, T, 256, "bfloat16"))
    ref, _ = layer.reference(x, routing=(ids, wts))
    assert relative_error(layer(x, routing=r).get(), ref) <= TOL["bfloat16"]
    bad = r._replace(topk_ids=r.topk_ids.copy())
    bad.topk_ids[7, 2] = N
    with pytest.raises(ValueError, match="routing.topk_ids: expected ids in"):
        layer(x, routing=bad)


@pytest.mark.parametrize("logit_dtype", ["bfloat16", "float16"])
def test_low_precision_router_logits_on_gpu(logit_dtype, rng):
    from zeromoe_cupy._arrays import np_dtype
    cfg = zm.MoEConfig.preset("tiny", dtype="bfloat16")
    layer = zm.ZeroExpertMoE(cfg, device="cuda")
    x = cp.asarray(random_x(rng, 33, cfg.hidden_size, "bfloat16"))
    L = cp.asarray(rng.standard_normal((33, cfg.num_total_experts)).astype(np_dtype(logit_dtype)))
    ref, _ = layer.reference(x, router_logits=L.astype(np.float32))
    assert relative_error(layer(x, router_logits=L).get(), ref) <= TOL["bfloat16"]


def test_from_weights_moves_arrays_to_the_asked_device(rng):
    cfg = zm.MoEConfig.preset("tiny")
    w = random_layer_weights(rng, cfg)
    on_gpu = zm.ZeroExpertMoE.from_weights(cfg, **w, device="cuda")
    assert on_gpu.device == "cuda" and isinstance(on_gpu.w13, cp.ndarray)
    assert zm.ZeroExpertMoE.from_weights(cfg, **w, device="auto").device == "cuda"
    on_cpu = zm.ZeroExpertMoE.from_weights(cfg, **{k: cp.asarray(v) for k, v in w.items()},
                                           device="cpu")
    assert on_cpu.device == "cpu" and isinstance(on_cpu.w13, np.ndarray)
    x = random_x(rng, 9, cfg.hidden_size, cfg.dtype)
    np.testing.assert_allclose(on_gpu(cp.asarray(x)).get(), on_cpu(x), rtol=1e-4, atol=1e-5)
