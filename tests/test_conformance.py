"""docs/spec.md and the public interface checked against an evaluation written here, from the documents'
text alone (float64 NumPy; no code of the package's reference.py): routing (steps 2-7, grouped
top-k, drop_zero), the forward (mixed zero experts, MoE++ options), FP8 block quantization
and forward math with short blocks, and expert parallelism with unequal token counts. The
package's own oracle (reference.py) is held to the same independent evaluation, since every
other test compares against it."""
import inspect
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy import ops, reference

from conftest import TOL

E4M3 = ml_dtypes.float8_e4m3fn
DT = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


# ---- the spec's math, written from its text --------------------------------------------------

def spec_scores(L, scoring):
    L = np.asarray(L, np.float64)
    if scoring == "softmax":
        e = np.exp(L - L.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-L))


def spec_route(L, K, scoring="softmax", beta=None, renormalize=False, rsf=1.0, G=None, g=None,
               zero_kinds=None, E=None, sigma=None):
    """Steps 2-7 (and drop_zero, logits normalization): (ids [T, K], w [T, K], s [T, N])."""
    L = np.asarray(L, np.float64)
    if sigma is not None:
        std = L.std(axis=1, ddof=1, keepdims=True)
        L = np.where(std == 0, L, L / (std / sigma))
    T, N = L.shape
    p = spec_scores(L, scoring)
    s = p + (0.0 if beta is None else np.asarray(beta, np.float64))
    ids = np.empty((T, K), np.int64)
    for t in range(T):
        allowed = np.ones(N, bool)
        if G is not None:
            size = N // G
            grp = s[t].reshape(G, size)
            top = -np.sort(-grp, axis=1)
            score = top[:, :2].sum(axis=1) if beta is not None else top[:, 0]
            keep = sorted(range(G), key=lambda i: (-score[i], i))[:g]
            allowed = np.repeat(np.isin(np.arange(G), keep), size)
        cand = [e for e in range(N) if allowed[e]]
        ids[t] = sorted(cand, key=lambda e: (-s[t, e], e))[:K]
    w = np.take_along_axis(p, ids, axis=1)
    if renormalize == "drop_zero":
        kinds = list(zero_kinds)
        zero = np.array([e >= E and kinds[e - E] == "zero" for e in range(N)])
        w = np.where(zero[ids], 0.0, w)
        tot = w.sum(axis=1, keepdims=True)
        w = np.where(tot == 0, 0.0, w / np.where(tot == 0, 1.0, tot))
    elif renormalize:
        w = w / w.sum(axis=1, keepdims=True)
    return ids, w * rsf, s


def spec_ffn(x, w13, w2):
    x = np.asarray(x, np.float64)
    I = w13.shape[0] // 2
    gate, up = w13[:I] @ x, w13[I:] @ x
    return w2 @ (gate / (1.0 + np.exp(-gate)) * up)


def spec_zero(kind, x, vec=None, gate=None):
    if kind == "identity":
        return x
    if kind == "zero":
        return np.zeros_like(x)
    g = gate @ x
    a = np.exp(g - g.max())
    a /= a.sum()
    return a[0] * x + a[1] * vec


def spec_forward(x, W, cfg, ids, w, fp8=False):
    """Step 8 for given routing, float64; ``W`` host weights as from_weights takes them."""
    E, kinds = cfg.num_experts, cfg.zero_types
    dt = x.dtype
    xe = np.asarray(x, np.float64)
    if cfg.expert_input_scale != 1:  # every expert reads s * x rounded to x's dtype
        xe = (xe * cfg.expert_input_scale).astype(dt).astype(np.float64)
    f64 = {k: None if v is None else np.asarray(v).astype(np.float64)
           for k, v in W.items() if k not in ("w13", "w2")}
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < E and fp8:
                out = spec_fp8_ffn(xe[t], W["w13"][e], W["w13_scale_inv"][e], W["w2"][e],
                                   W["w2_scale_inv"][e], dt)
            elif e < E:
                out = spec_ffn(xe[t], np.asarray(W["w13"][e], np.float64),
                               np.asarray(W["w2"][e], np.float64))
            else:
                j = e - E
                out = spec_zero(kinds[j], xe[t],
                                None if f64.get("const_vec") is None else f64["const_vec"][j],
                                None if f64.get("const_gate") is None else f64["const_gate"][j])
            y[t] += w[t, k] * out
    return y


# FP8 (docs/spec.md "FP8 experts")
def spec_quantize(W):
    """One matrix [N, K] -> (q e4m3 [N, K], scale_inv fp32 [ceil(N/128), ceil(K/128)])."""
    W = np.asarray(W).astype(np.float32)
    N, K = W.shape
    nb, kb = -(-N // 128), -(-K // 128)
    q = np.empty((N, K), E4M3)
    s = np.empty((nb, kb), np.float32)
    for i in range(nb):
        for j in range(kb):
            blk = W[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            sc = np.float32(np.abs(blk).max()) / np.float32(448)
            sc = np.float32(1) if sc == 0 else sc
            s[i, j] = sc
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = \
                np.clip(blk / sc, -448, 448).astype(E4M3)
    return q, s


def spec_dequantize(q, s):
    q = np.asarray(q).view(E4M3).astype(np.float64)
    full = np.repeat(np.repeat(np.asarray(s, np.float64), 128, 0), 128, 1)
    return q * full[:q.shape[0], :q.shape[1]]


def spec_act_quant(a):
    a = np.asarray(a, np.float64).astype(np.float32)
    out = np.empty(a.shape, np.float64)
    for g in range(0, a.size, 128):
        grp = a[g:g + 128]
        sa = np.float32(max(np.abs(grp).max(), np.float32(1e-10))) / np.float32(448)
        out[g:g + 128] = np.clip(grp / sa, -448, 448).astype(E4M3).astype(np.float64) * sa
    return out


def spec_fp8_ffn(x, q13, s13, q2, s2, dt):
    I = q13.shape[0] // 2
    ib = -(-I // 128)
    w13 = np.concatenate([spec_dequantize(q13[:I], s13[:ib]), spec_dequantize(q13[I:], s13[ib:])])
    gu = (w13 @ spec_act_quant(x)).astype(dt).astype(np.float64)  # rounded to x's dtype
    h = (gu[:I] / (1.0 + np.exp(-gu[:I])) * gu[I:]).astype(np.float32)  # fp32, not x's dtype
    return spec_dequantize(q2, s2) @ spec_act_quant(h)


def rel(y, ref):
    y = np.asarray(y, np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def separated(s, ids_allowed_scores, K):
    """Rows whose K-th and (K+1)-th selection scores differ by more than 1e-6 relative."""
    top = -np.sort(-ids_allowed_scores, axis=1)
    a, b = top[:, K - 1], top[:, K] if top.shape[1] > K else np.full(len(top), -np.inf)
    return np.abs(a - b) > 1e-6 * np.maximum(np.abs(a), np.abs(b))


def random_weights(rng, cfg):
    H, I, E, Z, N = (cfg.hidden_size, cfg.intermediate_size, cfg.num_experts,
                     cfg.num_zero_experts, cfg.num_total_experts)
    dt = DT[cfg.dtype]
    R = cfg.router_hidden_size
    W = dict(router_weight=(rng.standard_normal((N, R or H)) * (R or H) ** -0.5).astype(np.float32),
             w13=(rng.standard_normal((E, 2 * I, H)) * H ** -0.5).astype(dt),
             w2=(rng.standard_normal((E, H, I)) * I ** -0.5).astype(dt))
    if cfg.use_correction_bias:
        W["e_score_correction_bias"] = (rng.standard_normal(N) * 0.05).astype(np.float32)
    if cfg.has_constant_experts:
        W["const_vec"] = rng.standard_normal((Z, H)).astype(dt)
        W["const_gate"] = (rng.standard_normal((Z, 2, H)) * H ** -0.5).astype(dt)
    if R:
        W["router_hidden_weight"] = (rng.standard_normal((R, H)) * H ** -0.5).astype(np.float32)
    if cfg.gating_residual:
        W["gate_map"] = (rng.standard_normal((N, N)) * N ** -0.5).astype(np.float32)
    return W


# ---- routing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_beta", [False, True])
@pytest.mark.parametrize("renorm", [False, True, "drop_zero"])
@pytest.mark.parametrize("groups", [None, (4, 2)])
def test_routing_follows_the_spec_text(scoring, with_beta, renorm, groups, rng):
    E, Z, K, T = 12, 8, 5, 40
    kinds = tuple(rng.choice(["identity", "zero", "constant"], Z))
    L = (rng.standard_normal((T, E + Z)) * 2).astype(np.float32)
    beta = (rng.standard_normal(E + Z) * 0.2).astype(np.float32) if with_beta else None
    G, g = groups or (None, None)
    drop = [k == "zero" for k in ("",) * E + kinds] if renorm == "drop_zero" else None
    got = ops.route(L, K, scoring_func=scoring, e_score_correction_bias=beta, renormalize=renorm,
                    routed_scaling_factor=2.5, num_expert_group=G, topk_group=g,
                    drop_experts=drop)
    ids, w, s = spec_route(L, K, scoring, beta, renorm, 2.5, G, g, kinds, E)
    ref = reference.route(L, K, scoring, beta, renorm, 2.5, G, g, drop_experts=drop)
    mask = np.isfinite(ref.selection_scores)  # the experts of the kept groups
    rows = separated(s, np.where(mask, s, -np.inf), K)
    assert rows.mean() > 0.8
    for r in (got, ref):
        np.testing.assert_array_equal(np.asarray(r[0])[rows], ids[rows])
        np.testing.assert_allclose(np.asarray(r[1], np.float64)[rows], w[rows], rtol=2e-6,
                                   atol=1e-7)
    assert got.topk_ids.dtype == np.int32 and got.topk_weights.dtype == np.float32
    assert got.expert_counts.dtype == np.int32 and got.expert_counts.shape == (E + Z,)
    np.testing.assert_array_equal(got.expert_counts,
                                  np.bincount(got.topk_ids.ravel(), minlength=E + Z))
    # the selection scores descend along each row
    sel = np.take_along_axis(s, got.topk_ids.astype(np.int64), axis=1)
    assert (np.diff(sel[rows], axis=1) <= 0).all()


def test_group_score_is_the_sum_of_two_best_with_a_bias_and_the_max_without():
    # Group 0 holds one large score, group 1 two medium ones: with a bias (of 0) group 1's sum
    # wins, without a bias group 0's max does.
    L = np.log(np.array([[0.50, 0.01, 0.30, 0.30]], np.float64)).astype(np.float32)
    with_beta = ops.route(L, 1, e_score_correction_bias=np.zeros(4, np.float32),
                          num_expert_group=2, topk_group=1)
    without = ops.route(L, 1, num_expert_group=2, topk_group=1)
    assert with_beta.topk_ids[0, 0] in (2, 3) and without.topk_ids[0, 0] == 0


def test_ties_nan_and_minus_inf_follow_the_spec_order():
    # sigmoid scores: equal logits tie (lower id first); -inf and the lowest float rank above
    # NaN; a NaN logit never gives an id outside [0, E+Z).
    lo = np.finfo(np.float32).min
    L = np.array([[np.nan, 1.0, -np.inf, 1.0, lo, np.nan, 0.5, 1.0]], np.float32)
    r = ops.route(L, 8, scoring_func="sigmoid")
    # sigmoid(lowest float) > 0 = sigmoid(-inf) exactly: 4 before 2
    np.testing.assert_array_equal(r.topk_ids[0], [1, 3, 7, 6, 4, 2, 0, 5])
    assert ((r.topk_ids >= 0) & (r.topk_ids < 8)).all()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_scores_that_underflow_fp32_rank_by_their_exact_values(scoring, rng):
    # selection order of the float64 scores even where fp32 scores are 0
    T, N, K = 6, 16, 4
    L = (rng.standard_normal((T, N)) * 4 - 120).astype(np.float32)
    if scoring == "softmax":
        L[:, 0] = 60  # the others are e^-180 below: 0 in fp32, distinct in float64
    ids, w, s = spec_route(L, K, scoring, renormalize=True)
    r = ops.route(L, K, scoring_func=scoring, renormalize=True)
    np.testing.assert_array_equal(r.topk_ids, ids)
    assert np.isfinite(r.topk_weights).all()  # step 10: no 0/0
    np.testing.assert_allclose(r.topk_weights, w, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_beta", [False, True])
def test_grouped_top_k_where_group_scores_underflow_fp32(scoring, with_beta, rng):
    T, N, K, G, g = 16, 16, 3, 4, 2
    L = (rng.standard_normal((T, N)) * 4 - 120).astype(np.float32)
    if scoring == "softmax":
        L[:, 0] = 60
    # a bias of 0: the groups' fp32 sums of their two best scores underflow and tie; their
    # float64 sums decide (the NumPy path; the GPU kernel still ties them)
    beta = np.zeros(N, np.float32) if with_beta else None  # None: the best score decides
    ids, _, _ = spec_route(L, K, scoring, beta, False, 1.0, G, g)
    np.testing.assert_array_equal(
        reference.route(L, K, scoring, beta, False, 1.0, G, g).topk_ids, ids)
    r = ops.route(L, K, scoring_func=scoring, e_score_correction_bias=beta,
                  num_expert_group=G, topk_group=g)
    np.testing.assert_array_equal(r.topk_ids, ids)


# ---- the forward --------------------------------------------------------------------------------

FORWARD_CASES = [
    # (dtype, H, overrides)
    ("float32", 257, dict(zero_expert_type=("identity", "zero", "constant", "constant"),
                          routed_scaling_factor=2.0)),
    ("bfloat16", 96, dict(zero_expert_type="constant", scoring_func="sigmoid",
                          use_correction_bias=True, renormalize=True)),
    ("float16", 130, dict(zero_expert_type=("zero", "identity", "zero", "constant"),
                          renormalize="drop_zero", expert_input_scale=3.0)),
    ("float32", 72, dict(zero_expert_type=("constant", "constant", "identity", "zero"),
                         renormalize="drop_zero", expert_input_scale=2.0, router_hidden_size=24,
                         gating_residual=True, router_logits_norm_std=1.0)),
    ("bfloat16", 64, dict(num_expert_group=4, topk_group=2, use_correction_bias=True,
                          zero_expert_type="identity", routed_scaling_factor=6.0)),
]


@pytest.mark.parametrize("dtype,H,over", FORWARD_CASES)
def test_forward_follows_the_spec_text(dtype, H, over, rng):
    cfg = zm.MoEConfig(hidden_size=H, intermediate_size=40, num_experts=12, num_zero_experts=4,
                       top_k=4, dtype=dtype, **over)
    W = random_weights(rng, cfg)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **W, device="cpu")
    T = 24
    x = rng.standard_normal((T, H)).astype(DT[dtype])
    prev = (rng.standard_normal((T, 16)) * 2).astype(np.float32) if cfg.gating_residual else None
    x_before = x.copy()
    y, L = layer(x, prev_router_logits=prev, return_router_logits=True)
    assert y.dtype == x.dtype and y.shape == x.shape and L.dtype == np.float32
    np.testing.assert_array_equal(x, x_before)
    # step 1 and the MoE++ router: L after the residual, before the normalization
    x64 = x.astype(np.float64)
    if cfg.router_hidden_size:
        want_L = np.tanh(x64 @ W["router_hidden_weight"].T.astype(np.float64)) \
            @ W["router_weight"].T.astype(np.float64)
    else:
        want_L = x64 @ W["router_weight"].T.astype(np.float64)
    if prev is not None:
        want_L += prev.astype(np.float64) @ W["gate_map"].T.astype(np.float64)
    np.testing.assert_allclose(L, want_L, rtol=1e-4, atol=1e-5)
    ids, w, s = spec_route(want_L, cfg.top_k, cfg.scoring_func,
                           W.get("e_score_correction_bias"), cfg.renormalize,
                           cfg.routed_scaling_factor, cfg.num_expert_group, cfg.topk_group,
                           cfg.zero_types, cfg.num_experts, cfg.router_logits_norm_std)
    r = layer.route(x, prev_router_logits=prev)
    rows = separated(s, s, cfg.top_k) if cfg.num_expert_group is None else np.ones(T, bool)
    np.testing.assert_array_equal(r.topk_ids[rows], ids[rows])
    ref = spec_forward(x, W, cfg, ids, w)
    assert rel(y[rows], ref[rows]) <= TOL[dtype]
    # the package's oracle agrees with the text
    ref_pkg, _ = layer.reference(x, prev_router_logits=prev)
    assert rel(ref_pkg[rows], ref[rows]) <= 1e-12


def test_return_router_logits_with_given_logits(rng):
    # given logits stand for L: returned as they are (fp32), no residual added, the
    # normalization still applies to the scores.
    cfg = zm.MoEConfig(hidden_size=32, intermediate_size=16, num_experts=6, num_zero_experts=2,
                       zero_expert_type=("identity", "zero"), top_k=2, dtype="float32",
                       gating_residual=True, router_logits_norm_std=0.5)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **random_weights(rng, cfg), device="cpu")
    x = rng.standard_normal((9, 32)).astype(np.float32)
    given = (rng.standard_normal((9, 8)) * 3).astype(np.float16)
    y, L = layer(x, router_logits=given, return_router_logits=True)
    assert L.dtype == np.float32
    np.testing.assert_array_equal(L, given.astype(np.float32))
    ids, _, _ = spec_route(given, 2, sigma=0.5)
    np.testing.assert_array_equal(layer.route(x, router_logits=given).topk_ids, ids)
    plain = zm.ZeroExpertMoE.from_weights(cfg.__class__(**{**cfg.to_dict(),
                                                           "gating_residual": False,
                                                           "zero_expert_type": "identity"}),
                                          **{k: v for k, v in random_weights(rng, cfg).items()
                                             if k != "gate_map"}, device="cpu")
    with pytest.raises(ValueError, match="prev_router_logits"):
        plain(x, prev_router_logits=np.zeros((9, 8), np.float32))
    with pytest.raises(ValueError, match="prev_router_logits"):
        plain.route(x, prev_router_logits=np.zeros((9, 8), np.float32))


# ---- FP8 ----------------------------------------------------------------------------------------

def test_fp8_quantize_follows_the_spec_block_math(rng):
    E, I, H = 2, 160, 200  # short last blocks in every direction, gate and up blocked apart
    cfg = zm.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_zero_experts=2,
                       top_k=2, dtype="bfloat16")
    W = random_weights(rng, cfg)
    W["w13"][0, :I, :128] = 0                          # a block of zeros: scale 1
    W["w13"][1, I:I + 128, 128:] = 1e-38               # a block of tiny values
    W["w2"][0, :128, :128] *= 1e4                       # values beyond 448 before scaling
    layer = zm.ZeroExpertMoE.from_weights(cfg, **W, device="cpu")
    q = layer.quantize("fp8")
    assert q.config.quantization == "fp8" and layer.config.quantization is None
    assert q.w13_scale_inv.shape == (E, 2 * 2, 2) and q.w2_scale_inv.shape == (E, 2, 2)
    assert q.w13_scale_inv.dtype == np.float32 and q.w2_scale_inv.dtype == np.float32
    assert q.w13.shape == (E, 2 * I, H) and q.w2.shape == (E, H, I)
    assert q.w13.dtype == E4M3 and q.w2.dtype == E4M3  # NumPy has float8 through ml_dtypes
    for e in range(E):
        for half in (slice(0, I), slice(I, 2 * I)):
            want_q, want_s = spec_quantize(W["w13"][e, half])
            rows = slice(0, 2) if half.start == 0 else slice(2, 4)
            np.testing.assert_array_equal(q.w13_scale_inv[e, rows], want_s)
            np.testing.assert_array_equal(np.asarray(q.w13[e, half]).view(np.uint8),
                                          want_q.view(np.uint8))
        want_q, want_s = spec_quantize(W["w2"][e])
        np.testing.assert_array_equal(q.w2_scale_inv[e], want_s)
        np.testing.assert_array_equal(np.asarray(q.w2[e]).view(np.uint8), want_q.view(np.uint8))
    assert q.w13_scale_inv[0, 0, 0] == 1


def test_fp8_scale_of_a_block_whose_quotient_underflows_is_one():
    from zeromoe_cupy import quant
    W = np.zeros((1, 130, 140), np.float32)
    W[0, :128, :128] = 1e-44        # max / 448 underflows fp32 to 0
    W[0, 128:, 128:] = 3.0
    qw, s = quant.quantize_weight(W)
    want_q, want_s = spec_quantize(W[0])
    np.testing.assert_array_equal(np.asarray(s)[0], want_s)
    assert np.asarray(s)[0, 0, 0] == 1
    np.testing.assert_array_equal(np.asarray(qw)[0].view(np.uint8), want_q.view(np.uint8))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fp8_forward_follows_the_spec_math(dtype, rng):
    E, I, H = 4, 144, 200  # last weight blocks and activation groups short
    cfg = zm.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_zero_experts=2,
                       zero_expert_type=("identity", "constant"), top_k=3, dtype=dtype,
                       routed_scaling_factor=1.5)
    W = random_weights(rng, cfg)
    layer8 = zm.ZeroExpertMoE.from_weights(cfg, **W, device="cpu").quantize("fp8")
    W8 = {k: getattr(layer8, k) for k in ("router_weight", "w13", "w2", "w13_scale_inv",
                                           "w2_scale_inv", "const_vec", "const_gate")}
    W8["w13"], W8["w2"] = np.asarray(W8["w13"]).view(E4M3), np.asarray(W8["w2"]).view(E4M3)
    x = (rng.standard_normal((10, H)) * 2).astype(DT[dtype])
    r = layer8.route(x)
    y = layer8(x)
    ref = spec_forward(x, W8, cfg, r.topk_ids, r.topk_weights.astype(np.float64), fp8=True)
    assert rel(y, ref) <= 5e-3
    assert rel(layer8.reference(x)[0], ref) <= 1e-5  # the oracle: the same math, float64
    # a layer built from the quantized tensors (ml_dtypes e4m3) computes the same
    cfg8 = zm.MoEConfig(**{**cfg.to_dict(), "zero_expert_type": cfg.zero_types,
                           "quantization": "fp8"})
    again = zm.ZeroExpertMoE.from_weights(cfg8, **W8, device="cpu")
    np.testing.assert_array_equal(again(x), y)


# ---- expert parallelism --------------------------------------------------------------------------

@pytest.mark.parametrize("R,counts", [(2, (7, 0)), (3, (0, 5, 11)), (4, (3, 0, 9, 1))])
def test_ranks_compute_the_whole_layer_on_their_tokens(R, counts, rng):
    E = 12
    cfg = zm.MoEConfig(hidden_size=48, intermediate_size=24, num_experts=E, num_zero_experts=3,
                       zero_expert_type=("identity", "zero", "constant"), top_k=3,
                       dtype="float32", use_correction_bias=True, routed_scaling_factor=2.0)
    W = random_weights(rng, cfg)
    whole = zm.ZeroExpertMoE.from_weights(cfg, **W, device="cpu")
    xs = [rng.standard_normal((t, 48)).astype(np.float32) for t in counts]

    def body(group):
        layer = zm.ZeroExpertMoE.from_weights(cfg, **W, device="cpu", group=group)
        assert layer.w13.shape == (E // R, 48, 48) and layer.w2.shape == (E // R, 48, 24)
        lo = group.rank * E // R
        np.testing.assert_array_equal(layer.w13, W["w13"][lo:lo + E // R])
        x = xs[group.rank]
        r = layer.route(x)
        y = layer(x)
        return r, y, layer(x, routing=r)

    groups = zm.parallel.local_groups(R)  # one thread per rank, as the API shows
    with ThreadPoolExecutor(R) as pool:
        results = list(pool.map(body, groups))
    for rank, (r, y, y_again) in enumerate(results):
        x = xs[rank]
        assert y.shape == x.shape and y.dtype == np.float32
        np.testing.assert_array_equal(r.expert_counts,
                                      np.bincount(r.topk_ids.ravel(), minlength=15))
        ids, w, s = spec_route(x.astype(np.float64) @ W["router_weight"].T.astype(np.float64),
                               3, beta=W["e_score_correction_bias"], rsf=2.0)
        np.testing.assert_array_equal(r.topk_ids, ids)
        if x.shape[0]:
            ref = spec_forward(x, W, cfg, ids, w)
            assert rel(y, ref) <= 1e-5
            assert rel(y_again, ref) <= 1e-5
            assert rel(y, whole(x)) <= 2e-5


@pytest.mark.parametrize("R", [3, 4])
def test_experts_not_divisible_by_ranks_raise_on_every_rank(R, rng):
    cfg = zm.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=10, num_zero_experts=2,
                       top_k=2, dtype="float32")
    W = random_weights(rng, cfg)

    def body(group):
        errors = []
        for make in (lambda: zm.ZeroExpertMoE(cfg, device="cpu", group=group),
                     lambda: zm.ZeroExpertMoE.from_weights(cfg, **W, device="cpu", group=group)):
            with pytest.raises(ValueError) as info:
                make()
            errors.append(str(info.value))
        return errors

    for errors in zm.parallel.run_local(body, R):
        assert all("10" in e for e in errors)


def test_groups_have_rank_and_world_size():
    groups = zm.parallel.local_groups(3)
    assert [(g.rank, g.world_size) for g in groups] == [(0, 3), (1, 3), (2, 3)]


# ---- the interface -------------------------------------------------------------------------------

def test_public_names_and_signatures():
    def params(f):
        return {n: (p.kind, p.default) for n, p in inspect.signature(f).parameters.items()}
    assert {"route", "zero_expert_output", "expert_mlp", "combine"} <= set(dir(ops))
    assert callable(zm.parallel.init) and callable(zm.parallel.local_groups)
    cfg_params = params(zm.MoEConfig)
    for name in ("hidden_size", "intermediate_size", "num_experts", "num_zero_experts",
                 "zero_expert_type", "top_k", "scoring_func", "renormalize",
                 "routed_scaling_factor", "num_expert_group", "topk_group", "dtype",
                 "quantization", "weight_block_size", "expert_input_scale",
                 "router_hidden_size", "gating_residual", "router_logits_norm_std"):
        assert name in cfg_params
    assert cfg_params["weight_block_size"][1] == (128, 128)
    assert cfg_params["quantization"][1] is None
    init = params(zm.ZeroExpertMoE)
    assert init["seed"][1] == 0 and init["device"][1] == "auto"
    fw = params(zm.ZeroExpertMoE.from_weights)
    for name in ("router_weight", "w13", "w2", "e_score_correction_bias", "router_bias",
                 "const_vec", "const_gate", "w13_scale_inv", "w2_scale_inv",
                 "router_hidden_weight", "gate_map"):
        assert name in fw
    fp = params(zm.ZeroExpertMoE.from_pretrained)
    assert fp["device"][1] == "auto" and fp["dtype"][1] is None and "layer" in fp
    assert params(zm.ZeroExpertMoE.load)["device"][1] == "auto"
    call = params(zm.ZeroExpertMoE.__call__)
    assert call["prev_router_logits"][1] is None and call["return_router_logits"][1] is False
    for name in ("router_logits", "routing"):
        assert name in call
    route = params(zm.ZeroExpertMoE.route)
    assert "router_logits" in route and "prev_router_logits" in route
    graphed = params(zm.ZeroExpertMoE.graphed)
    assert "max_tokens" in graphed and "capture_sizes" in graphed
    for name in ("tiny", "longcat-flash", "moe++-7b"):
        assert zm.MoEConfig.preset(name) == zm.MoEConfig.preset(name, top_k=zm.MoEConfig.preset(
            name).top_k)
    assert zm.MoEConfig.preset("longcat-flash", quantization="fp8").weight_block_size == (128, 128)


def test_graphed_on_a_cpu_layer_is_a_value_error_naming_the_device():
    layer = zm.ZeroExpertMoE(zm.MoEConfig.preset("tiny"), device="cpu")
    with pytest.raises(ValueError, match="cpu"):
        layer.graphed(max_tokens=8)


@pytest.mark.skipif(zm.gpu_available(), reason="the CPU fallback of the demo")
def test_demo_runs_on_the_cpu_and_says_so(capsys):
    from zeromoe_cupy import cli
    assert cli.main(["demo"]) == 0
    assert "cpu" in capsys.readouterr().out.lower()
