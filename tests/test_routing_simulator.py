"""The GPU routing kernel's algorithm under Numba's CUDA simulator, against the reference.

The simulator has no warp shuffles, so it runs the same kernel body with block-wide
reductions in their place (`_route_kernel._SIM`). Only runs when the
simulator is active (conftest turns it on when no GPU is visible).
"""
import os

import numpy as np
import pytest

from zeromoe_cupy import ops, reference
from zeromoe_cupy.routing import drop_words, launch_route_kernel

from helpers import (biased_tie_case, extreme_routing_case, one_lane_wins_logits,
                     separated_rows, underflow_routing_case)

pytest.importorskip("numba", reason="needs numba (the cuda13 / cuda12 extra)")
pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                                reason="the simulator runs only on machines without a GPU")


def run_kernel(logits, top_k, scoring="softmax", bias=None, renorm=False, rsf=1.0,
               groups=None, topk_group=None, max_blocks=None, drop=None, norm_std=None):
    from numba import cuda
    from zeromoe_cupy._route_kernel import make_route_kernel
    T, n = logits.shape
    kernel = cuda.jit(make_route_kernel(groups is not None, n))
    ids = np.full((T, top_k), -7, np.int32)
    w = np.full((T, top_k), np.nan, np.float32)
    counts = np.zeros(n, np.int32)

    def launch(k, grid, block, args, shared):
        args = [a.ravel() if isinstance(a, np.ndarray) else a for a in args]
        k[grid, block, 0, shared](*args)

    code = 2 if renorm == "drop_zero" else int(renorm)
    launch_route_kernel(kernel, logits.astype(np.float32), bias, ids, w, counts, top_k,
                        scoring, code, rsf, groups, topk_group, launch, max_blocks,
                        drop=None if drop is None else drop_words(drop), norm_std=norm_std)
    return ids, w, counts


CASES = [
    # (T, N, K, scoring, bias, renorm, rsf, groups, topk_group)
    (5, 20, 2, "softmax", False, True, 1.0, None, None),    # MoE++-like
    (6, 64, 8, "sigmoid", True, False, 2.5, 8, 4),           # DeepSeek-like, scaled down
    (3, 96, 12, "softmax", True, False, 6.0, None, None),    # LongCat-like, scaled down
    (2, 33, 5, "sigmoid", False, True, 1.0, 3, 2),           # N not a multiple of 32
    (1, 7, 7, "softmax", False, False, 1.0, None, None),     # K = N
    (2, 300, 12, "softmax", True, True, 6.0, None, None),    # 3 groups of 4 a lane, a part
    (2, 258, 6, "sigmoid", True, False, 1.0, 6, 3),          # scalar loads, 3 groups a lane
]


@pytest.mark.parametrize("T,N,K,scoring,has_bias,renorm,rsf,groups,tg", CASES)
def test_simulated_kernel_matches_reference(T, N, K, scoring, has_bias, renorm, rsf, groups, tg):
    rng = np.random.default_rng(N * 31 + K)
    logits = rng.standard_normal((T, N)).astype(np.float32)
    bias = (rng.standard_normal(N) * 0.05).astype(np.float32) if has_bias else None
    logits_before = logits.copy()
    ids, w, counts = run_kernel(logits, K, scoring, bias, renorm, rsf, groups, tg)
    ref = reference.route(logits, K, scoring, bias, renorm, rsf, groups, tg)
    ok = separated_rows(logits.astype(np.float64), dict(
        top_k=K, scoring_func=scoring, renormalize=renorm, num_expert_group=groups,
        topk_group=tg), bias=None if bias is None else bias.astype(np.float64))
    assert ok.any()
    np.testing.assert_array_equal(ids[ok], ref.topk_ids[ok])
    np.testing.assert_allclose(w[ok], ref.topk_weights[ok], rtol=1e-5)
    np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=N))
    np.testing.assert_array_equal(logits, logits_before)


def test_simulated_kernel_nan_rows_give_valid_ids():
    logits = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    logits[0, :] = np.nan
    logits[1, 5] = np.nan
    ids, w, counts = run_kernel(logits, 4, "sigmoid")
    assert ((ids >= 0) & (ids < 40)).all()
    assert ids[0].tolist() == [0, 1, 2, 3]          # all NaN: ties to the lower ids
    assert 5 not in ids[1].tolist()                 # a NaN score ranks below every finite one
    ref = reference.route(logits, 4, "sigmoid")
    np.testing.assert_array_equal(ids, ref.topk_ids)


@pytest.mark.parametrize("order", ["descending", "ascending"])
def test_simulated_kernel_one_lane_wins_many_times(order):
    # Experts 0-3, 128-131 (all owned by lane 0) hold the top scores, so lane 0 gives
    # more winners than it caches and must rescan; both scan orders of its experts.
    N, K = 200, 9
    logits = one_lane_wins_logits(2, N, order)
    ids, w, _ = run_kernel(logits, K, "softmax")
    ref = reference.route(logits, K, "softmax")
    np.testing.assert_array_equal(ids, ref.topk_ids)
    np.testing.assert_allclose(w, ref.topk_weights, rtol=1e-5)


def test_simulated_kernel_ties_go_to_lower_ids():
    # Equal scores in many lanes at once: the order must follow the ids.
    N, K = 200, 12
    logits = np.stack([np.zeros(N), np.arange(N) % 7, -(np.arange(N) % 5)]).astype(np.float32)
    for scoring in ("softmax", "sigmoid"):
        ids, w, _ = run_kernel(logits, K, scoring)
        ref = reference.route(logits, K, scoring)
        np.testing.assert_array_equal(ids, ref.topk_ids)
        np.testing.assert_allclose(w, ref.topk_weights, rtol=1e-5)


@pytest.mark.parametrize("groups,tg", [(None, None), (4, 2)])
def test_simulated_kernel_blocks_loop_over_tokens(groups, tg):
    # Two blocks of 8 warps for 19 tokens: each block routes tokens in steps of 16, the last
    # step with idle warps; the per-block counts add up to the whole histogram.
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((19, 40)).astype(np.float32)
    bias = (rng.standard_normal(40) * 0.05).astype(np.float32)
    ids, w, counts = run_kernel(logits, 4, "sigmoid", bias, True, 2.0, groups, tg, max_blocks=2)
    ref = reference.route(logits, 4, "sigmoid", bias, True, 2.0, groups, tg)
    np.testing.assert_array_equal(ids, ref.topk_ids)
    np.testing.assert_allclose(w, ref.topk_weights, rtol=1e-5)
    np.testing.assert_array_equal(counts, np.bincount(ref.topk_ids.ravel(), minlength=40))


@pytest.mark.parametrize("scoring,groups,tg,renorm", [
    ("sigmoid", None, None, False), ("softmax", None, None, True), ("sigmoid", 4, 3, True),
    ("softmax", 4, 3, False)])
def test_simulated_kernel_nan_ranks_below_minus_inf_and_the_lowest_float(scoring, groups, tg,
                                                                         renorm, rng):
    from test_routing_numerics import check_against_reference
    N = 24
    logits, bias = extreme_routing_case(rng, 3, N, scoring, with_bias=True)
    K = N - 2 if groups is None else tg * N // groups - 2
    K = min(K, 32)
    r = run_kernel(logits, K, scoring, bias, renorm, 1.0, groups, tg)
    check_against_reference(r, logits, K, scoring, bias, renorm, groups, tg)
    logits, _ = extreme_routing_case(rng, 3, N, "sigmoid", with_bias=False)
    r = run_kernel(logits, K, "sigmoid", None, renorm, 1.0, groups, tg)
    check_against_reference(r, logits, K, "sigmoid", None, renorm, groups, tg)


@pytest.mark.parametrize("scoring,bias_kind,renorm,groups", [
    ("sigmoid", None, True, None), ("softmax", None, False, None), ("sigmoid", "zero", False, None),
    ("softmax", "two", True, None), ("softmax", "two", True, 8), ("sigmoid", None, False, 8)])
def test_simulated_kernel_scores_that_underflow(scoring, bias_kind, renorm, groups, rng):
    from test_routing_numerics import check_against_reference
    N, K = 64, 6
    tg = 4 if groups else None
    logits, bias = underflow_routing_case(rng, 4, N, scoring, bias_kind)
    r = run_kernel(logits, K, scoring, bias, renorm, 1.0, groups, tg)
    check_against_reference(r, logits, K, scoring, bias, renorm, groups, tg)
    if renorm:
        assert np.isfinite(r[1]).all()


@pytest.mark.parametrize("N,K,scoring,groups,tg,drop,norm", [
    (20, 2, "softmax", None, None, [19], 1.0),                 # MoE++-7B: the last expert
    (20, 2, "softmax", None, None, [19], None),
    (40, 5, "sigmoid", None, None, [0, 3, 31, 32, 33, 39], None),  # both bit words
    (64, 6, "softmax", 4, 2, list(range(32, 64, 2)), None),    # grouped
])
def test_simulated_kernel_drop_zero(N, K, scoring, groups, tg, drop, norm):
    # renormalize="drop_zero": flagged experts' slots weigh 0, the rest renormalized; rows
    # whose every slot is flagged get all-zero weights, never NaN.
    rng = np.random.default_rng(N + K)
    mask = np.zeros(N, bool)
    mask[drop] = True
    logits = rng.standard_normal((12, N)).astype(np.float32)
    logits[:3, drop[:K]] += 6  # every slot of these rows goes to a flagged expert
    logits[3:6, drop[0]] += 6  # one flagged slot first
    bias = (rng.standard_normal(N) * 0.001).astype(np.float32) if groups else None
    ids, w, counts = run_kernel(logits, K, scoring, bias, "drop_zero", 2.0, groups, tg,
                                drop=mask, norm_std=norm)
    ref = reference.route(logits, K, scoring, bias, "drop_zero", 2.0, groups, tg,
                          drop_experts=mask, logits_norm_std=norm)
    np.testing.assert_array_equal(ids, ref.topk_ids)
    np.testing.assert_allclose(w, ref.topk_weights, rtol=1e-5, atol=1e-12)
    assert not np.isnan(w).any()
    flagged = mask[ids]
    assert flagged[:6].any(axis=1).all()  # the case is exercised
    all_flagged = flagged.all(axis=1)
    assert all_flagged[:3].all() == (len(drop) >= K)
    assert (w[flagged] == 0).all() and (w[all_flagged] == 0).all()
    np.testing.assert_allclose(w[~all_flagged].sum(axis=1), 2.0, rtol=1e-5)
    np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=N))


@pytest.mark.parametrize("N,K,scoring,sigma,has_bias", [
    (20, 2, "softmax", 1.0, False), (33, 4, "sigmoid", 2.5, True), (130, 6, "softmax", 0.3, True)])
def test_simulated_kernel_logits_normalization(N, K, scoring, sigma, has_bias):
    # The kernel normalizes each token's logits, L / (std(L) / sigma); a token with equal
    # logits (std 0) keeps them; a NaN logit makes the token's weights NaN with valid ids.
    rng = np.random.default_rng(N)
    logits = (rng.standard_normal((9, N)) * 3 + 1).astype(np.float32)
    logits[1] = 0.75
    logits[2, 5] = np.nan
    bias = (rng.standard_normal(N) * 0.01).astype(np.float32) if has_bias else None
    ids, w, counts = run_kernel(logits, K, scoring, bias, True, 1.5, norm_std=sigma)
    ref = reference.route(logits, K, scoring, bias, True, 1.5, logits_norm_std=sigma)
    np.testing.assert_array_equal(ids, ref.topk_ids)
    ok = np.arange(9) != 2
    np.testing.assert_allclose(w[ok], ref.topk_weights[ok], rtol=1e-5)
    assert np.isnan(w[2]).all() and ((ids[2] >= 0) & (ids[2] < N)).all()
    _, w_plain, _ = run_kernel(logits, K, scoring, bias, True, 1.5)  # unnormalized: differs
    assert not np.allclose(w_plain[ok], w[ok], rtol=1e-3)


def extreme_scale_logits(rng, T, N, scale):
    """Random logits at one scale ("max": +-3e38 beside ordinary logits, and rows spread
    up to 3e38); row 1 all equal (std 0: kept as they are)."""
    if scale == "max":
        logits = rng.standard_normal((T, N))
        logits[T // 2:] = np.clip(logits[T // 2:] * 1e38, -3e38, 3e38)
        logits = logits.astype(np.float32)
        logits[:, 5], logits[:, 6] = 3e38, -3e38
        logits[1] = -3e38
    else:
        logits = (rng.standard_normal((T, N)) * scale).astype(np.float32)
        logits[1] = np.float32(0.75 * scale)
    return logits


@pytest.mark.parametrize("scale", [1e-40, 1e-25, 1e-22, 1e19, "max"])
@pytest.mark.parametrize("N,K,scoring,has_bias,groups,tg", [
    (20, 2, "softmax", False, None, None), (64, 6, "sigmoid", True, 8, 4)])
def test_simulated_kernel_logits_normalization_at_extreme_scales(scale, N, K, scoring,
                                                                 has_bias, groups, tg):
    # The std of logits near fp32's limits neither underflows to 0 nor overflows: every
    # token is normalized as the float64 reference does; only equal logits stay as they are,
    # and an infinite logit makes the token's weights NaN with valid ids (as a NaN does).
    rng = np.random.default_rng(N)
    logits = extreme_scale_logits(rng, 8, N, scale)
    logits[2, 3] = np.inf
    bias = (rng.standard_normal(N) * 0.01).astype(np.float32) if has_bias else None
    ids, w, counts = run_kernel(logits, K, scoring, bias, True, 1.5, groups, tg, norm_std=1.0)
    ref = reference.route(logits, K, scoring, bias, True, 1.5, groups, tg, logits_norm_std=1.0)
    np.testing.assert_array_equal(ids, ref.topk_ids)
    ok = np.arange(8) != 2
    np.testing.assert_allclose(w[ok], ref.topk_weights[ok], rtol=1e-5)
    assert np.isnan(w[2]).all() and ((ids[2] >= 0) & (ids[2] < N)).all()
    np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=N))


@pytest.mark.parametrize("scoring,N,mixed,groups,tg", [
    ("sigmoid", 40, False, None, None), ("softmax", 200, True, None, None),
    ("softmax", 40, False, 4, 3), ("sigmoid", 40, True, 4, 3)])
def test_simulated_kernel_exact_ties_of_unequal_biases_go_to_the_lower_id(scoring, N, mixed,
                                                                         groups, tg, rng):
    # ... and fp32 ties of equal biases (underflowed scores) to the larger logit.
    K = 12
    logits, bias, expected = biased_tie_case(rng, 3, N, scoring, mixed)
    ids, w, _ = run_kernel(logits, K, scoring, bias, False, 1.0, groups, tg)
    ref = reference.route(logits, K, scoring, bias, False, 1.0, groups, tg)
    np.testing.assert_array_equal(ids, ref.topk_ids)
    if groups is None:
        np.testing.assert_array_equal(ids, expected[:, :K])


@pytest.mark.parametrize("scoring,norm", [("softmax", None), ("sigmoid", None),
                                          ("sigmoid", 4.0)])
@pytest.mark.parametrize("N,groups,tg", [(16, 4, 2), (258, 6, 3)])
def test_simulated_kernel_groups_whose_scores_underflow(scoring, norm, N, groups, tg, rng):
    # A bias of 0 on some experts: groups whose two best fp32 scores underflow rank by their
    # exact sums, as in float64, not by group id (their fp32 sums tie or round apart).
    from test_routing_numerics import check_against_reference
    T, K = 8, 3
    logits = (rng.standard_normal((T, N)) * 4 - 120).astype(np.float32)
    if scoring == "softmax":
        logits[:, 0] = 60
    bias = np.where(rng.random(N) < 0.8, 0, -0.5).astype(np.float32)
    if norm is not None:  # logits about -12 +- 0.4, normalized to about -120 +- 4
        logits = (logits / 10).astype(np.float32)
    r = run_kernel(logits, K, scoring, bias, False, 1.0, groups, tg, norm_std=norm)
    ref = reference.route(logits, K, scoring, bias, False, 1.0, groups, tg,
                          logits_norm_std=norm)
    np.testing.assert_array_equal(r[0], ref.topk_ids)
    numpy_path = ops.route(logits, K, scoring_func=scoring, e_score_correction_bias=bias,
                           num_expert_group=groups, topk_group=tg, logits_norm_std=norm)
    np.testing.assert_array_equal(numpy_path.topk_ids, ref.topk_ids)
    if norm is None:
        check_against_reference(r, logits, K, scoring, bias, False, groups, tg)


def test_simulated_kernel_groups_without_a_bias_rank_by_their_largest_logit(rng):
    # sigmoid scores of 1.0 (fp32 and nearly all float64): the groups' largest logits decide
    from test_routing_numerics import check_against_reference, saturated_group_case
    L = saturated_group_case(rng, 6, 48)
    r = run_kernel(L, 4, "sigmoid", None, False, 1.0, 6, 2)
    check_against_reference(r, L, 4, "sigmoid", None, False, 6, 2)
