"""Reliability on the GPU: determinism, chunking, memory bounds and errors, leaks, threads,
NaN isolation, routing at fp32's edges, fp16 intermediates beyond 65504."""
import threading

import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy.reference import relative_error

from conftest import TOL
from helpers import (biased_tie_case, ep_fp16_cancellation_case, extreme_routing_case,
                     fp16_negative_gate_case, fp16_overflow_case, random_layer_weights, random_x,
                     underflow_routing_case)

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")

CFG = zm.MoEConfig(hidden_size=512, intermediate_size=256, num_experts=64, num_zero_experts=32,
                   top_k=8, use_correction_bias=True, routed_scaling_factor=2.5,
                   zero_expert_type="identity", dtype="bfloat16")


@pytest.fixture
def layer(rng):
    w = random_layer_weights(rng, CFG, bias_scale=0.01)
    return zm.ZeroExpertMoE.from_weights(CFG, **{k: cp.asarray(v) for k, v in w.items()})


def test_repeated_calls_are_bitwise_identical(layer, rng):
    x = cp.asarray(random_x(rng, 777, 512, "bfloat16"))
    first = layer(x)
    for _ in range(5):
        cp.testing.assert_array_equal(layer(x), first)


def test_chunk_sizes_agree(layer, rng):
    x = cp.asarray(random_x(rng, 500, 512, "bfloat16"))
    ref, _ = layer.reference(x)
    for chunk in (500, 250, 97, 1):
        layer.max_chunk_tokens = chunk
        y = layer(x)
        assert relative_error(y.get(), ref) <= TOL["bfloat16"]
        # For a given chunk size the result is bitwise reproducible. (Across chunk sizes cuBLAS
        # may pick other GEMM algorithms for other row counts; benchmarks/chunk_bitwise.py
        # measures whether the bits still agree.)
        cp.testing.assert_array_equal(layer(x), y)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_deterministic_layer_is_bitwise_chunk_invariant(dtype, rng):
    import dataclasses
    cfg = dataclasses.replace(CFG, dtype=dtype)
    w = random_layer_weights(rng, cfg, bias_scale=0.01)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **{k: cp.asarray(v) for k, v in w.items()},
                                          deterministic=True)
    x = cp.asarray(random_x(rng, 500, 512, dtype))
    whole = layer(x)
    ref, _ = layer.reference(x)
    assert relative_error(whole.get(), ref) <= TOL[dtype]
    for chunk in (250, 97, 8, 1):
        layer.max_chunk_tokens = chunk
        cp.testing.assert_array_equal(layer(x).view(cp.uint8), whole.view(cp.uint8))
    cp.testing.assert_array_equal(layer(x[123:124]).view(cp.uint8),
                                  whole[123:124].view(cp.uint8))


def test_no_memory_growth_over_1000_forwards(layer, rng):
    x = cp.asarray(random_x(rng, 64, 512, "bfloat16"))
    pool = cp.get_default_memory_pool()
    for _ in range(10):
        layer(x)
    cp.cuda.Device().synchronize()
    used, total = pool.used_bytes(), pool.total_bytes()
    for _ in range(1000):
        layer(x)
    cp.cuda.Device().synchronize()
    assert pool.used_bytes() == used
    assert pool.total_bytes() <= total + (1 << 20)


def test_out_of_memory_says_how_much_and_what_to_lower(layer, rng):
    x = cp.asarray(random_x(rng, 4096, 512, "bfloat16"))
    pool = cp.get_default_memory_pool()
    layer(x[:8])
    cp.cuda.Device().synchronize()
    pool.free_all_blocks()
    pool.set_limit(size=pool.used_bytes() + x.nbytes * 2)
    try:
        with pytest.raises(MemoryError, match="lower max_chunk_tokens"):
            layer(x)
    finally:
        pool.set_limit(size=0)


def test_workspace_stays_inside_the_documented_bound_at_65536_tokens(rng):
    cfg = zm.MoEConfig.preset("longcat-flash")
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cuda")
    x = cp.random.default_rng(3).standard_normal((65536, cfg.hidden_size),
                                                 dtype=cp.float32).astype(layer.w13.dtype)
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    pool.free_all_blocks()
    # The pool may allocate at most the documented workspace on top of what it holds now;
    # when a request would pass the limit it first hands back its cached free blocks, so
    # this bounds the live workspace at its peak.
    pool.set_limit(size=pool.total_bytes() + layer.workspace_bytes(65536))
    try:
        y = layer(x)
        cp.cuda.Device().synchronize()
    finally:
        pool.set_limit(size=0)
    assert y.shape == x.shape
    ref_rows = layer(x[:16384][:64])  # the first chunk's rows, computed alone
    assert relative_error(y[:64].get(), ref_rows.get()) <= TOL["bfloat16"]


@pytest.mark.parametrize("E,T,strategy", [(64, 256, "auto"), (64, 256, "capacity"),
                                          (128, 48, "auto"), (64, 256, "grouped"),
                                          (64, 256, "syncfree")])
def test_workspace_bound_of_each_expert_path(E, T, strategy, rng):
    # (64, 256, "auto"): the capacity path (C = 56); (128, 48, "auto"): one uniform tile
    cfg = zm.MoEConfig(hidden_size=512, intermediate_size=256, num_experts=E,
                       num_zero_experts=16, top_k=8, dtype="bfloat16")
    w = random_layer_weights(rng, cfg)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **{k: cp.asarray(v) for k, v in w.items()},
                                          expert_strategy=strategy)
    x = cp.asarray(random_x(rng, T, cfg.hidden_size, "bfloat16"))
    layer(x)  # compiles, fills the layer's caches
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    pool.free_all_blocks()
    pool.set_limit(size=pool.total_bytes() + layer.workspace_bytes(T))
    try:
        y = layer(x)
        cp.cuda.Device().synchronize()
    finally:
        pool.set_limit(size=0)
    ref, _ = layer.reference(x)
    assert relative_error(y.get(), ref) <= TOL["bfloat16"]


def test_two_threads_on_their_own_streams(layer, rng):
    xs = [cp.asarray(random_x(rng, 3000, 512, "bfloat16")) for _ in range(2)]
    expected = [layer(x) for x in xs]
    cp.cuda.Device().synchronize()
    results, errors = [None, None], []

    def work(i):
        try:
            with cp.cuda.Stream(non_blocking=True) as stream:
                outs = [layer(xs[i]) for _ in range(10)]
                stream.synchronize()
            results[i] = outs
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        for out in results[i]:
            cp.testing.assert_array_equal(out, expected[i])


def test_nan_in_one_token_stays_in_that_row(layer, rng):
    xh = random_x(rng, 40, 512, "bfloat16")
    xh[7, 100] = np.nan
    x = cp.asarray(xh)
    r = layer.route(x)
    ids = r.topk_ids.get()
    assert ((ids >= 0) & (ids < CFG.num_total_experts)).all()
    y = layer(x, routing=r).get().astype(np.float32)
    assert np.isnan(y[7]).all()
    assert np.isfinite(np.delete(y, 7, axis=0)).all()


def test_random_configs_on_the_gpu_match_the_cpu_bound():
    # The CPU property test's configs and error bound, on the GPU, for a bounded number of
    # examples.
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from test_properties import _magnitude, configs

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cfg=configs(), T=st.integers(0, 9), seed=st.integers(0, 2**31 - 1),
           deterministic=st.booleans())
    def check(cfg, T, seed, deterministic):
        import ml_dtypes
        rng = np.random.default_rng(seed)
        w = random_layer_weights(rng, cfg, bias_scale=0.02 if cfg.use_correction_bias else 0)
        layer = zm.ZeroExpertMoE.from_weights(cfg, **{k: cp.asarray(v) for k, v in w.items()},
                                              deterministic=deterministic)
        x_h = random_x(rng, T, cfg.hidden_size, cfg.dtype)
        x = cp.asarray(x_h)
        r = layer.route(x)
        y = layer(x, routing=r).get()
        ids, wts = r.topk_ids.get(), r.topk_weights.get()
        assert ((ids >= 0) & (ids < cfg.num_total_experts)).all()
        ref, _ = layer.reference(x, routing=(ids, wts))
        host = zm.RoutingResult(ids, wts, None)
        cpu_layer = zm.ZeroExpertMoE.from_weights(cfg, **w)
        underflow = float(ml_dtypes.finfo(x_h.dtype).smallest_subnormal) * \
            (1 + cfg.intermediate_size) * np.sqrt(x_h.size)
        err = np.linalg.norm(y.astype(np.float64) - ref)
        assert err <= TOL[cfg.dtype] * np.linalg.norm(_magnitude(cpu_layer, x_h, host)) + \
            underflow
        cp.testing.assert_array_equal(x, cp.asarray(x_h))

    check()


def _route_on_gpu(logits, K, scoring, bias, renorm, groups=None, tg=None):
    r = zm.ops.route(cp.asarray(logits), K, scoring_func=scoring,
                     e_score_correction_bias=None if bias is None else cp.asarray(bias),
                     renormalize=renorm, num_expert_group=groups, topk_group=tg)
    ids = r.topk_ids.get()
    np.testing.assert_array_equal(r.expert_counts.get(),
                                  np.bincount(ids.ravel(), minlength=logits.shape[1]))
    return ids, r.topk_weights.get()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups,tg", [(None, None), (4, 3)])
@pytest.mark.parametrize("renorm", [False, True])
def test_gpu_routing_nan_ranks_below_minus_inf_and_the_lowest_float(scoring, groups, tg, renorm,
                                                                   rng):
    from test_routing_numerics import check_against_reference
    N = 24
    K = N - 2 if groups is None else tg * N // groups - 2
    for with_bias in (True, False):
        if not with_bias and scoring == "softmax":
            continue  # softmax: the NaN scores come from the bias
        logits, bias = extreme_routing_case(rng, 40, N, scoring, with_bias)
        r = _route_on_gpu(logits, K, scoring, bias, renorm, groups, tg)
        check_against_reference(r, logits, K, scoring, bias, renorm, groups, tg)


# (Group scores with a bias are fp32 sums: groups whose sums underflow tie and go by group id,
# so "zero" runs without groups.)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias_kind,N,groups", [
    (b, N, g) for b in (None, "zero", "two")
    for N, g in ((64, None), (64, 8), (300, None), (768, None), (768, 8))
    if not (b == "zero" and g)])
def test_gpu_routing_scores_that_underflow(scoring, bias_kind, N, groups, rng):
    from test_routing_numerics import check_against_reference
    tg = 4 if groups else None
    logits, bias = underflow_routing_case(rng, 50, N, scoring, bias_kind)
    for renorm in (False, True):
        r = _route_on_gpu(logits, 12, scoring, bias, renorm, groups, tg)
        check_against_reference(r, logits, 12, scoring, bias, renorm, groups, tg)
        if renorm:
            assert np.isfinite(r[1]).all()


@pytest.mark.parametrize("strategy", ["auto", "pairs", "grouped", "padded", "fixed", "syncfree",
                                      "capacity"])
@pytest.mark.parametrize("kind", ["output", "activation"])
@pytest.mark.parametrize("T,H", [(12, 40), (12, 33), (300, 40)])
def test_gpu_fp16_intermediates_beyond_65504_leave_y_finite_and_right(strategy, kind, T, H, rng):
    cfg, w, x, ids, weights, ref = fp16_overflow_case(rng, kind, T=T, H=H)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **{k: cp.asarray(v) for k, v in w.items()})
    layer.expert_strategy = strategy
    routing = zm.RoutingResult(cp.asarray(ids), cp.asarray(weights), None)
    y = layer(cp.asarray(x), routing=routing).get()
    assert np.isfinite(y.astype(np.float32)).all()
    assert relative_error(y, ref) <= TOL["float16"]
    out = zm.ops.expert_mlp(cp.asarray(x), cp.asarray(ids), layer.w13, layer.w2,
                            strategy=strategy)
    assert out.rows.dtype == np.float32


@pytest.mark.parametrize("strategy", ["auto", "pairs", "grouped", "padded", "fixed", "syncfree",
                                      "capacity"])
@pytest.mark.parametrize("T,H", [(3, 8), (300, 64)])
def test_gpu_fp16_gate_below_minus_65504_gives_silus_limit(strategy, T, H, rng):
    # every kernel's silu goes through kernels/common.cuh swiglu: silu(-inf) = 0, not NaN
    cfg, w, x, ids, weights = fp16_negative_gate_case(rng, T=T, H=H)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **{k: cp.asarray(v) for k, v in w.items()})
    layer.expert_strategy = strategy
    ref, _ = layer.reference(cp.asarray(x), routing=(ids, weights))
    y = layer(cp.asarray(x), routing=zm.RoutingResult(cp.asarray(ids), cp.asarray(weights),
                                                      None)).get()
    assert np.isfinite(y.astype(np.float32)).all()
    assert relative_error(y, ref) <= TOL["float16"]


@pytest.mark.parametrize("strategy", ["pairs", "grouped", "padded"])
@pytest.mark.parametrize("T,H", [(12, 40), (12, 64), (300, 64)])
def test_gpu_fp8_layer_fp16_expert_outputs_beyond_65504_leave_y_finite_and_right(strategy, T,
                                                                                 H, rng):
    # An fp16 FP8 layer: its expert outputs (to about 5e5) are kept in fp32 as the unquantized
    # layer's are (rows_dtype); H = 64 takes the 16-byte and tensor-core kernels, 40 the others.
    cfg, w, x, ids, weights, _ = fp16_overflow_case(rng, "output", T=T, H=H)
    cpu8 = zm.ZeroExpertMoE.from_weights(cfg, **w).quantize("fp8")
    gpu8 = zm.ZeroExpertMoE.from_weights(cfg, **{k: cp.asarray(v) for k, v in w.items()}) \
        .quantize("fp8")
    gpu8.expert_strategy = strategy
    ref, _ = cpu8.reference(x, routing=(ids, weights))  # the FP8 math in float64
    y = gpu8(cp.asarray(x), routing=zm.RoutingResult(cp.asarray(ids), cp.asarray(weights),
                                                     None)).get()
    assert np.isfinite(y.astype(np.float32)).all()
    assert relative_error(y, ref) <= 5e-3


def test_gpu_fp16_partial_sums_beyond_65504_under_expert_parallelism(rng):
    cfg, w, x, routing, ref = ep_fp16_cancellation_case(rng)
    w = {k: cp.asarray(v) for k, v in w.items()}
    x = cp.asarray(x)
    routing = zm.RoutingResult(cp.asarray(routing.topk_ids), cp.asarray(routing.topk_weights),
                               None)

    def body(g):
        cp.cuda.Device(0).use()
        layer = zm.ZeroExpertMoE.from_weights(cfg, **w, group=g)
        return layer(x, routing=routing).get()

    for y in zm.parallel.run_local(body, 2, timeout=120.0):
        assert np.isfinite(y.astype(np.float32)).all()
        assert relative_error(y, ref) <= TOL["float16"]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("N,groups,tg", [(40, None, None), (300, None, None), (40, 4, 3),
                                         (768, 8, 4)])
def test_gpu_exact_ties_of_unequal_biases_go_to_the_lower_id(scoring, mixed, N, groups, tg, rng):
    # ... and fp32 ties of equal biases (underflowed scores) to the larger logit.
    from test_routing_numerics import check_against_reference
    K = 12
    logits, bias, expected = biased_tie_case(rng, 64, N, scoring, mixed)
    for renorm in (False, True):
        r = _route_on_gpu(logits, K, scoring, bias, renorm, groups, tg)
        check_against_reference(r, logits, K, scoring, bias, renorm, groups, tg)
        if groups is None:
            np.testing.assert_array_equal(r[0], expected[:, :K])


@pytest.mark.parametrize("strategy", ["auto", "pairs", "grouped", "padded", "fixed", "syncfree",
                                      "capacity"])
def test_gpu_expert_counts_that_do_not_match_the_ids_change_nothing(strategy, rng):
    # ops.expert_mlp counts the ids itself: wrong counts can neither read or write out of
    # bounds nor change the result.
    w = random_layer_weights(rng, CFG, bias_scale=0.01)
    layer = zm.ZeroExpertMoE.from_weights(CFG, **{k: cp.asarray(v) for k, v in w.items()})
    x = cp.asarray(random_x(rng, 300, 512, "bfloat16"))
    r = layer.route(x)
    ref, _ = layer.reference(x, routing=(r.topk_ids, r.topk_weights))
    counts = r.expert_counts
    E, Z = CFG.num_experts, CFG.num_zero_experts
    for wrong in (cp.zeros_like(counts), counts * 1000, -counts - 1, cp.roll(counts, 1)):
        out = zm.ops.expert_mlp(x, r.topk_ids, layer.w13, layer.w2, expert_counts=wrong,
                                strategy=strategy)
        y = zm.ops.combine(x, r.topk_ids, r.topk_weights, E, "identity", out,
                           num_zero_experts=Z)
        cp.cuda.Device().synchronize()
        assert relative_error(y.get(), ref) <= TOL["bfloat16"]
