"""The functional ops on NumPy arrays, stage by stage, against the float64 reference."""
import warnings

import numpy as np
import pytest

from zeromoe_cupy import ops, reference
from zeromoe_cupy._arrays import np_dtype
from zeromoe_cupy.reference import relative_error

from conftest import TOL
from helpers import random_x

DTYPES = ["float32", "float16", "bfloat16"]
TYPES = {"identity": "identity", "zero": "zero", "constant": "constant",
         "mixed": ("constant", "identity", "zero", "identity")}


def _zero_case(rng, T, H, K, E, Z, dtype):
    x = random_x(rng, T, H, dtype)
    ids = rng.integers(0, E + Z, (T, K)).astype(np.int32)
    w = (rng.random((T, K)) * 2).astype(np.float32)
    cv = rng.standard_normal((Z, H)).astype(np.float32).astype(np_dtype(dtype))
    cg = (rng.standard_normal((Z, 2, H)) * H ** -0.5).astype(np.float32).astype(np_dtype(dtype))
    return x, ids, w, cv, cg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(TYPES))
@pytest.mark.parametrize("H", [1, 7, 257])
def test_zero_expert_output_numpy(H, kind, dtype, rng):
    T, K, E, Z = 9, 5, 3, 4
    x, ids, w, cv, cg = _zero_case(rng, T, H, K, E, Z, dtype)
    before = [a.copy() for a in (x, ids, w, cv, cg)]
    out = ops.zero_expert_output(x, ids, w, E, TYPES[kind], const_vec=cv, const_gate=cg,
                                 num_zero_experts=Z)
    for a, b in zip((x, ids, w, cv, cg), before):
        np.testing.assert_array_equal(a, b)
    ref, _ = reference.forward(x, None, np.zeros((E, 2, H)), np.zeros((E, H, 1)), top_k=K,
                               num_experts=E, zero_expert_type=TYPES[kind], const_vec=cv,
                               const_gate=cg, routing=(ids, w * (ids >= E)))
    assert out.dtype == x.dtype and out.shape == x.shape
    if kind == "zero":
        assert not out.astype(np.float32).any()
    else:
        assert relative_error(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_stages_compose_to_the_reference(dtype, rng):
    T, H, I, E, Z, K = 21, 48, 24, 5, 3, 3
    types = ("identity", "zero", "constant")
    x, ids, w, cv, cg = _zero_case(rng, T, H, K, E, Z, dtype)
    dt = np_dtype(dtype)
    w13 = (rng.standard_normal((E, 2 * I, H)) * H ** -0.5).astype(np.float32).astype(dt)
    w2 = (rng.standard_normal((E, H, I)) * I ** -0.5).astype(np.float32).astype(dt)
    marks = []
    out = ops.expert_mlp(x, ids, w13, w2, stage_marks=marks.append)
    assert marks == ["permute", "gemm1", "activation", "gemm2"]
    real = ids < E
    assert out.rows.shape == (int(real.sum()), H)
    assert (out.slot_rows[~real] == -1).all()
    assert sorted(out.slot_rows[real].tolist()) == list(range(int(real.sum())))
    y = ops.combine(x, ids, w, E, types, out, cv, cg)
    ref, _ = reference.forward(x, None, w13, w2, top_k=K, num_experts=E, zero_expert_type=types,
                               const_vec=cv, const_gate=cg, routing=(ids, w))
    assert relative_error(y, ref) <= TOL[dtype]


def test_route_op_numpy_matches_reference(rng):
    logits = rng.standard_normal((50, 24)).astype(np.float32)
    bias = (rng.standard_normal(24) * 0.01).astype(np.float32)
    r = ops.route(logits, 4, scoring_func="sigmoid", e_score_correction_bias=bias,
                  renormalize=True, routed_scaling_factor=2.0, num_expert_group=4, topk_group=2)
    ref = reference.route(logits, 4, "sigmoid", bias, True, 2.0, 4, 2)
    np.testing.assert_array_equal(r.topk_ids, ref.topk_ids)
    np.testing.assert_allclose(r.topk_weights, ref.topk_weights, rtol=1e-5)


def test_router_logits_op(rng):
    x = random_x(rng, 6, 16, "bfloat16")
    W = rng.standard_normal((10, 16)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    L = ops.router_logits(x, W, b)
    assert L.dtype == np.float32
    np.testing.assert_allclose(L, x.astype(np.float64) @ W.T.astype(np.float64) + b, rtol=1e-5,
                               atol=1e-5)


def test_combine_rejects_out_of_range_ids(rng):
    x, ids, w, _, _ = _zero_case(rng, 4, 8, 2, 3, 2, "float32")
    ids[1, 1] = 5
    with pytest.raises(ValueError, match=r"topk_ids: expected ids in \[0, 5\)"):
        ops.zero_expert_output(x, ids, w, 3, ("identity", "zero"))
    ids[1, 1] = -1
    with pytest.raises(ValueError, match="topk_ids"):
        ops.combine(x, ids, w, 3, ("identity", "zero"))


@pytest.mark.parametrize("num_zero_experts", [None, 0])
def test_unknown_zero_expert_type_refused_with_no_zero_expert_slot(num_zero_experts, rng):
    # every id names a real expert (and Z = 0 given or inferred): the name is still checked
    x, ids, w, _, _ = _zero_case(rng, 4, 8, 2, 3, 2, "float32")
    ids = ids % 3
    for op in (ops.zero_expert_output, ops.combine):
        with pytest.raises(ValueError, match="zero_expert_type"):
            op(x, ids, w, 3, "copy", num_zero_experts=num_zero_experts)


def test_constant_experts_need_their_parameters(rng):
    x, ids, w, cv, _ = _zero_case(rng, 4, 8, 2, 3, 2, "float32")
    with pytest.raises(ValueError, match="const_vec, const_gate"):
        ops.zero_expert_output(x, ids, w, 3, "constant", num_zero_experts=2)
    with pytest.raises(ValueError, match="const_gate: expected shape"):
        ops.zero_expert_output(x, ids, w, 3, "constant", const_vec=cv, const_gate=cv)


@pytest.mark.parametrize("pad,max_tile", [(64, 512), (64, 256), (4, 8), (1, 512)])
def test_tile_plan_covers_each_experts_rows(pad, max_tile, rng):
    from zeromoe_cupy.experts import tile_plan
    counts = rng.integers(0, 1300, 40)
    counts[[3, 7]] = 0
    counts[5] = max_tile  # exactly one whole tile
    starts, rows_total, tiles = tile_plan(counts, pad, max_tile)
    padded = -(-counts // pad) * pad
    assert np.all(padded - counts < pad) and rows_total == padded.sum()
    assert starts[0] == 0 and np.array_equal(starts[1:], np.cumsum(padded)[:-1])
    if pad == 1:
        assert tiles == []
        return
    assert len({size for size, _, _ in tiles}) == len(tiles)  # one entry per tile size
    owner = np.full(rows_total, -1)
    for size, experts, first in tiles:
        assert 0 < size <= max_tile and size % pad == 0 and experts.shape == first.shape
        for e, r in zip(experts, first):
            assert np.all(owner[r:r + size] == -1)  # tiles never overlap
            owner[r:r + size] = e
    for e, (s, p) in enumerate(zip(starts, padded)):
        assert np.all(owner[s:s + p] == e)  # every padded row of e lies in one of e's tiles


def test_split_bf16_carries_every_fp32_bit(rng):
    from zeromoe_cupy.routing import split_bf16
    w = (rng.standard_normal((64, 300)) * np.logspace(-6, 3, 300)).astype(np.float32)
    w[0, :4] = [0.0, -0.0, 1e-30, -3.0e38]
    parts = split_bf16(w)
    assert all(p.dtype == np_dtype("bfloat16") and p.shape == w.shape for p in parts)
    total = sum(p.astype(np.float64) for p in parts)
    assert np.all(np.abs(total - w) <= np.abs(w.astype(np.float64)) * 2.0 ** -24)


def test_combine_takes_weights_in_any_float_dtype(rng):
    x, ids, w, cv, cg = _zero_case(rng, 9, 33, 3, 2, 4, "float32")
    w_bf16 = w.astype(np_dtype("bfloat16"))
    kw = dict(const_vec=cv, const_gate=cg, num_zero_experts=4)
    np.testing.assert_array_equal(
        ops.zero_expert_output(x, ids.astype(np.int64), w_bf16, 2, "constant", **kw),
        ops.zero_expert_output(x, ids, w_bf16.astype(np.float32), 2, "constant", **kw))


def _real_and_zero_case(rng, T=12, H=16, I=8, K=3, E=4, Z=2):
    """x, ids (every row has a real and a zero-expert slot), weights, w13, w2."""
    x, ids, w, _, _ = _zero_case(rng, T, H, K, E, Z, "float32")
    ids[:, 0] = rng.integers(0, E, T)
    ids[:, 1] = rng.integers(E, E + Z, T)
    w13 = (rng.standard_normal((E, 2 * I, H)) * H ** -0.5).astype(np.float32)
    w2 = (rng.standard_normal((E, H, I)) * I ** -0.5).astype(np.float32)
    return x, ids, w, w13, w2


def test_combine_refuses_num_experts_that_contradict_expert_output(rng):
    E, Z = 4, 2
    x, ids, w, w13, w2 = _real_and_zero_case(rng, E=E, Z=Z)
    out = ops.expert_mlp(x, ids, w13, w2)
    y = ops.combine(x, ids, w, E, "identity", out)
    ref, _ = reference.forward(x, None, w13, w2, top_k=3, num_experts=E,
                               zero_expert_type="identity", routing=(ids, w))
    assert relative_error(y, ref) <= TOL["float32"]
    # Too many: zero-expert slots read as real experts without a row; too few: real rows
    # read as zero experts. Either way a wrong y unless refused.
    for wrong, z in ((E + 1, Z - 1), (E + Z, 0), (100, None), (E - 1, Z + 1), (0, E + Z)):
        with pytest.raises(ValueError, match="num_experts / expert_output"):
            ops.combine(x, ids, w, wrong, "identity", out, num_zero_experts=z)
    # slot_rows of other ids, and rows past the end of expert_output.rows
    other = ops.expert_mlp(x, np.roll(ids, 1, axis=1), w13, w2)
    with pytest.raises(ValueError, match="expert_output"):
        ops.combine(x, ids, w, E, "identity", other)
    with pytest.raises(ValueError, match="expert_output"):
        ops.combine(x, ids, w, E, "identity", (out.rows[:-1], out.slot_rows))
    # The layer's path (check_ids=False) pays nothing and checks nothing.
    ops.combine(x, ids, w, E + 1, "identity", out, num_zero_experts=Z - 1, check_ids=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp8", [False, True], ids=["plain", "fp8"])
@pytest.mark.parametrize("strategy", ["auto", "fixed"])
def test_nan_and_inf_in_x_give_nonfinite_rows_without_warnings(strategy, fp8, dtype, rng):
    from zeromoe_cupy.quant import quantize_weight
    E, Z, H = 4, 3, 16
    x, ids, w, w13, w2 = _real_and_zero_case(rng, H=H, E=E, Z=Z)
    _, _, _, cv, cg = _zero_case(rng, 1, H, 1, E, Z, dtype)
    dt = np_dtype(dtype)
    x, w13, w2 = x.astype(dt), w13.astype(dt), w2.astype(dt)
    scales = {}
    if fp8:
        (w13, s13), (w2, s2) = quantize_weight(w13, glu=True), quantize_weight(w2)
        scales = dict(w13_scale_inv=s13, w2_scale_inv=s2)
    bad = np.zeros(x.shape[0], bool)
    bad[[1, 4, 7]] = True
    x_bad = x.copy()
    x_bad[1, 3], x_bad[4, 0], x_bad[7, :] = np.inf, np.nan, -np.inf
    types = ("identity", "constant", "zero")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = []
        for xi in (x, x_bad):
            out = ops.expert_mlp(xi, ids, w13, w2, strategy=strategy, **scales)
            ys.append(ops.combine(xi, ids, w, E, types, out, cv, cg))
            ys.append(ops.zero_expert_output(xi, ids, w, E, types, cv, cg))
    for clean, dirty in (ys[0::2], ys[1::2]):
        assert np.isfinite(clean.astype(np.float32)).all()
        np.testing.assert_allclose(dirty[~bad].astype(np.float32),
                                   clean[~bad].astype(np.float32), rtol=2e-2, atol=2e-2)
    # Each bad row has a real slot: its y row is not finite (NaN, documented), not hidden.
    assert (~np.isfinite(ys[2][bad].astype(np.float32))).any(axis=1).all()
