"""fp16 layers whose intermediates pass 65504 while y fits (docs/spec.md, "Numerics and
accuracy"): an expert's output with a small routing weight, the activation silu(gate) * up,
and a rank's partial sum under expert parallelism.
The NumPy path here; every GPU path in test_reliability_gpu.py."""
import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy import ops
from zeromoe_cupy._arrays import np_dtype
from zeromoe_cupy.reference import relative_error

from conftest import TOL
from helpers import (ep_fp16_cancellation_case, fp16_negative_gate_case, fp16_overflow_case,
                     random_x)


@pytest.mark.parametrize("kind", ["output", "activation"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_fp16_intermediates_beyond_65504_leave_y_finite_and_right(kind, deterministic, rng):
    cfg, w, x, ids, weights, ref = fp16_overflow_case(rng, kind)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **w, deterministic=deterministic)
    y = layer(x, routing=zm.RoutingResult(ids, weights, None))
    assert np.isfinite(y.astype(np.float32)).all()
    assert relative_error(y, ref) <= TOL["float16"]


@pytest.mark.parametrize("deterministic", [False, True])
def test_fp16_gate_below_minus_65504_gives_silus_limit(deterministic, rng):
    """A gate past -65504 rounds to -inf in an fp16 layer's gate/up rows; silu(-inf) is its
    limit 0 (not -inf / inf = NaN), so the expert adds nothing there, as in float64."""
    cfg, w, x, ids, weights = fp16_negative_gate_case(rng)
    layer = zm.ZeroExpertMoE.from_weights(cfg, **w, deterministic=deterministic)
    y = layer(x, routing=zm.RoutingResult(ids, weights, None))
    ref, _ = layer.reference(x, routing=(ids, weights))
    assert np.isfinite(y.astype(np.float32)).all()
    assert relative_error(y, ref) <= TOL["float16"]


@pytest.mark.parametrize("kind", ["output", "activation"])
def test_fp16_expert_stages_keep_the_range(kind, rng):
    cfg, w, x, ids, weights, ref = fp16_overflow_case(rng, kind)
    out = ops.expert_mlp(x, ids, w["w13"], w["w2"])
    assert out.rows.dtype == np.float32  # the expert outputs of an fp16 layer
    y = ops.combine(x, ids, weights, cfg.num_experts, "zero", out,
                    num_zero_experts=cfg.num_zero_experts)
    assert np.isfinite(y.astype(np.float32)).all()
    assert relative_error(y, ref) <= TOL["float16"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_expert_rows_of_other_dtypes_stay_in_the_layer_dtype(dtype, rng):
    T, H, I, E = 5, 16, 8, 3
    dt = np_dtype(dtype)
    x = random_x(rng, T, H, dtype)
    w13 = rng.standard_normal((E, 2 * I, H)).astype(np.float32).astype(dt)
    w2 = rng.standard_normal((E, H, I)).astype(np.float32).astype(dt)
    ids = rng.integers(0, E, (T, 2)).astype(np.int32)
    assert ops.expert_mlp(x, ids, w13, w2).rows.dtype == dt


def test_fp16_partial_sums_beyond_65504_under_expert_parallelism(rng):
    cfg, w, x, routing, ref = ep_fp16_cancellation_case(rng)

    def body(g):
        layer = zm.ZeroExpertMoE.from_weights(cfg, **w, group=g)
        return layer(x, routing=routing)

    for y in zm.parallel.run_local(body, 2, timeout=60.0):
        assert np.isfinite(y.astype(np.float32)).all()
        assert relative_error(y, ref) <= TOL["float16"]
