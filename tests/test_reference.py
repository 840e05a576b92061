"""The float64 reference itself, on cases whose answer is known by construction."""
import numpy as np
import pytest

from zeromoe_cupy import reference


def test_softmax_topk_order_and_weights_by_hand():
    logits = np.log(np.array([[0.1, 0.4, 0.2, 0.3]]))  # softmax gives these probabilities
    r = reference.route(logits, 2, "softmax", routed_scaling_factor=2.0)
    assert r.topk_ids.tolist() == [[1, 3]]
    np.testing.assert_allclose(r.topk_weights, [[0.8, 0.6]], rtol=1e-12)


def test_bias_chooses_but_never_weights():
    logits = np.log(np.array([[0.1, 0.4, 0.2, 0.3]]))
    bias = np.array([0.5, 0.0, 0.0, 0.0])
    r = reference.route(logits, 2, "softmax", bias)
    assert r.topk_ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(r.topk_weights, [[0.1, 0.4]], rtol=1e-12)


def test_ties_go_to_the_lower_id_and_nan_ranks_last():
    logits = np.array([[0.0, 1.0, 1.0, np.nan, 1.0]])
    r = reference.route(logits, 4, "sigmoid")
    assert r.topk_ids.tolist() == [[1, 2, 4, 0]]


def test_all_nan_row_gives_valid_ids():
    r = reference.route(np.full((1, 5), np.nan), 3, "softmax")
    assert r.topk_ids.tolist() == [[0, 1, 2]]


def test_renormalize_sums_to_rsf():
    logits = np.random.default_rng(0).standard_normal((5, 9))
    r = reference.route(logits, 3, "sigmoid", renormalize=True, routed_scaling_factor=2.5)
    np.testing.assert_allclose(r.topk_weights.sum(1), 2.5, rtol=1e-12)


def test_grouped_topk_only_picks_from_best_groups():
    # Groups of 2: {0,1} {2,3} {4,5}.
    p = np.array([[0.9, 0.01, 0.5, 0.45, 0.8, 0.7]])
    # No bias: a group scores its best expert: 0.9, 0.5, 0.8 -> keep groups 0 and 2.
    r = reference.route(np.log(p), 3, "softmax", num_expert_group=3, topk_group=2)
    assert r.topk_ids.tolist() == [[0, 4, 5]]
    # With a bias the group score is the sum of its two best: 0.91, 0.95, 1.5 -> groups 2, 1.
    r = reference.route(np.log(p), 3, "softmax", np.zeros(6), num_expert_group=3, topk_group=2)
    assert r.topk_ids.tolist() == [[4, 5, 2]]


def test_forward_identity_zero_constant_by_hand():
    # One token, H=2, one real expert whose output we can compute by hand.
    x = np.array([[1.0, -2.0]])
    w13 = np.zeros((1, 2, 2))
    w13[0, 0] = [1.0, 0.0]   # gate = x0 = 1
    w13[0, 1] = [0.0, 1.0]   # up = x1 = -2
    w2 = np.array([[[1.0], [2.0]]])  # out = [h, 2h], h = silu(1) * -2
    h = 1.0 / (1.0 + np.exp(-1.0)) * -2.0
    const_gate = np.zeros((3, 2, 2))  # gate logits 0, 0 -> a = [0.5, 0.5]
    const_vec = np.array([[0, 0], [0, 0], [4.0, 6.0]])
    routing = (np.array([[0, 1, 2, 3]]), np.array([[1.0, 2.0, 3.0, 0.5]]))
    y, _ = reference.forward(x, None, w13, w2, top_k=4, num_experts=1,
                             zero_expert_type=("identity", "zero", "constant"),
                             const_vec=const_vec, const_gate=const_gate, routing=routing)
    expected = 1.0 * np.array([h, 2 * h]) + 2.0 * x[0] + 0.0 + 0.5 * (0.5 * x[0] + 0.5 * const_vec[2])
    np.testing.assert_allclose(y[0], expected, rtol=1e-12)


def test_relative_error():
    assert reference.relative_error([3.0, 4.0], [3.0, 4.0]) == 0.0
    assert reference.relative_error([0.0, 0.0], [3.0, 4.0]) == pytest.approx(1.0)
    # an all-zero ref: the absolute error
    assert reference.relative_error([[3.0, 4.0]], [[0.0, 0.0]]) == pytest.approx(5.0)
    # axes of length 1 may differ; other shapes are refused, never broadcast
    assert reference.relative_error(np.ones((1, 3)), np.ones(3)) == 0.0
    ref = np.ones((4, 3))
    for bad in (np.ones((1, 3)), np.ones(3), 1.0, np.ones((3, 4))):
        with pytest.raises(ValueError, match="shape"):
            reference.relative_error(bad, ref)


def test_forward_names_a_misshapen_argument():
    x = np.ones((3, 8))
    good = dict(router_weight=np.ones((6, 8)), w13=np.ones((4, 4, 8)), w2=np.ones((4, 8, 2)))
    for name, bad, want in [("router_weight", np.ones((6, 7)), r"\[E\+Z, 8\]"),
                            ("w13", np.ones((3, 4, 8)), r"\[4, 2I, 8\]"),
                            ("w2", np.ones((4, 8, 3)), r"\[4, 8, 2\]")]:
        args = dict(good, **{name: bad})
        with pytest.raises(ValueError, match=rf"{name}: expected shape {want}"):
            reference.forward(x, args["router_weight"], args["w13"], args["w2"], top_k=2,
                              num_experts=4)
    with pytest.raises(ValueError, match=r"x: expected shape \[T, H\]"):
        reference.forward(x[0], good["router_weight"], good["w13"], good["w2"], top_k=2,
                          num_experts=4)
