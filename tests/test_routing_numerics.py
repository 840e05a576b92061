"""Routing where fp32 is at its edges (docs/spec.md, "Routing rules"): NaN scores meeting
-inf and -FLT_MAX ones, and scores that underflow fp32. The NumPy path here; the same cases
run the kernel under the simulator (test_routing_simulator.py) and on the GPU
(test_reliability_gpu.py)."""
import numpy as np
import pytest

from zeromoe_cupy import ops, reference

from helpers import biased_tie_case, extreme_routing_case, underflow_routing_case

TINY = 3 * float(np.finfo(np.float32).smallest_subnormal)


def check_against_reference(r, logits, K, scoring, bias, renorm, groups=None, tg=None):
    """ids exactly; weights to fp32 rounding (NaN where the reference's are, an absolute
    slack of a few subnormal steps for unnormalized weights that underflow)."""
    ref = reference.route(logits, K, scoring, bias, renorm, 1.0, groups, tg)
    ids, w = (np.asarray(a) for a in r[:2])
    np.testing.assert_array_equal(ids, ref.topk_ids)
    np.testing.assert_allclose(w, ref.topk_weights, rtol=1e-5, atol=TINY, equal_nan=True)
    assert not np.isnan(w[~np.isnan(ref.topk_weights)]).any()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups,tg", [(None, None), (4, 3)])
@pytest.mark.parametrize("renorm", [False, True])
def test_nan_ranks_below_minus_inf_and_the_lowest_float(scoring, groups, tg, renorm, rng):
    N = 24
    logits, bias = extreme_routing_case(rng, 6, N, scoring, with_bias=True)
    K = N - 2 if groups is None else tg * N // groups - 2
    r = ops.route(logits, K, scoring_func=scoring, e_score_correction_bias=bias,
                  renormalize=renorm, num_expert_group=groups, topk_group=tg)
    check_against_reference(r, logits, K, scoring, bias, renorm, groups, tg)


def test_nan_logits_rank_below_minus_inf_logits_without_a_bias(rng):
    logits, _ = extreme_routing_case(rng, 5, 24, "sigmoid", with_bias=False)
    r = ops.route(logits, 22, scoring_func="sigmoid")
    check_against_reference(r, logits, 22, "sigmoid", None, False)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias_kind", [None, "zero", "two"])
@pytest.mark.parametrize("renorm", [False, True])
def test_scores_that_underflow_rank_and_weigh_exactly(scoring, bias_kind, renorm, rng):
    N, K = 64, 6
    logits, bias = underflow_routing_case(rng, 8, N, scoring, bias_kind)
    r = ops.route(logits, K, scoring_func=scoring, e_score_correction_bias=bias,
                  renormalize=renorm)
    check_against_reference(r, logits, K, scoring, bias, renorm)
    if renorm:
        assert np.isfinite(r.topk_weights).all()


@pytest.mark.parametrize("bias_kind", [None, "two"])
def test_underflowing_scores_in_groups(bias_kind, rng):
    N, K = 64, 6
    logits, bias = underflow_routing_case(rng, 8, N, "softmax", bias_kind)
    # Where the group scores underflow too both rank them by their exact sums; the order
    # inside the kept groups is the underflow case.
    r = ops.route(logits, K, e_score_correction_bias=bias, renormalize=True,
                  num_expert_group=8, topk_group=4)
    check_against_reference(r, logits, K, "softmax", bias, True, 8, 4)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mixed", [False, True])
def test_exact_ties_of_unequal_biases_go_to_the_lower_id(scoring, mixed, rng):
    # ... and fp32 ties of equal biases (underflowed scores) to the larger logit.
    N, K = 40, 12
    logits, bias, expected = biased_tie_case(rng, 6, N, scoring, mixed)
    for renorm in (False, True):
        r = ops.route(logits, K, scoring_func=scoring, e_score_correction_bias=bias,
                      renormalize=renorm)
        np.testing.assert_array_equal(r.topk_ids, expected[:, :K])
        check_against_reference(r, logits, K, scoring, bias, renorm)
    # grouped: the same order inside the kept groups
    r = ops.route(logits, K, scoring_func=scoring, e_score_correction_bias=bias,
                  num_expert_group=4, topk_group=3)
    check_against_reference(r, logits, K, scoring, bias, False, 4, 3)


def saturated_group_case(rng, T, N):
    """Sigmoid logits of 30 to 120: every score is 1.0 in fp32 and nearly all in float64, so
    only the logits order the experts and (without a bias) the groups."""
    return rng.uniform(30, 120, (T, N)).astype(np.float32)


@pytest.mark.parametrize("groups,tg,K", [(4, 1, 1), (8, 3, 5), (6, 2, 4)])
def test_groups_without_a_bias_rank_by_their_largest_logit(groups, tg, K, rng):
    # The group score without a bias is the group's largest logit (exact): the float64 oracle
    # too, where the groups' float64 scores all round to 1.0
    L = saturated_group_case(rng, 40, 48)
    r = ops.route(L, K, scoring_func="sigmoid", num_expert_group=groups, topk_group=tg)
    check_against_reference(r, L, K, "sigmoid", None, False, groups, tg)
    G = L.reshape(40, groups, -1).max(axis=2)
    best = np.argsort(-G, axis=1, kind="stable")[:, :tg]
    chosen_groups = np.asarray(r.topk_ids) // (48 // groups)
    assert all(set(c) <= set(b) for c, b in zip(chosen_groups, best))
    # the example: logits 40, -40, 120, 80 in four groups, one kept: 120's group
    one = np.array([[40., -40., 120., 80.]], np.float32)
    for route in (ops.route, reference.route):
        assert np.asarray(route(one, 1, scoring_func="sigmoid", num_expert_group=4,
                                topk_group=1).topk_ids).tolist() == [[2]]
