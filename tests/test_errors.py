"""Every bad input raises ValueError (shapes, values) or TypeError (dtypes, array kinds),
naming the argument."""
import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy import ops
from zeromoe_cupy._arrays import gpu_available

from helpers import random_layer_weights, random_x

CFG = zm.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, num_zero_experts=2,
                   top_k=2, dtype="float32")


@pytest.fixture
def layer(rng):
    return zm.ZeroExpertMoE.from_weights(CFG, **random_layer_weights(rng, CFG))


@pytest.fixture
def x(rng):
    return random_x(rng, 5, 16, "float32")


def test_x_errors(layer, x):
    with pytest.raises(ValueError, match=r"x: expected shape \[T, 16\]"):
        layer(x[:, :8])
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(x[0])
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        layer(x.astype(np.float16))
    with pytest.raises(TypeError, match="x: expected a NumPy/CuPy array"):
        layer(x.tolist())
    with pytest.raises(TypeError, match="x: expected an array, got None"):
        layer(None)


def test_router_logits_errors(layer, x):
    with pytest.raises(ValueError, match=r"router_logits: expected shape \(5, 6\)"):
        layer(x, router_logits=np.zeros((5, 5), np.float32))
    with pytest.raises(TypeError, match="router_logits: expected a floating-point"):
        layer(x, router_logits=np.zeros((5, 6), np.int32))


def test_routing_reuse_errors(layer, x):
    r = layer.route(x)
    with pytest.raises(ValueError, match=r"routing.topk_ids: expected shape \(4, 2\)"):
        layer(x[:4], routing=r)
    with pytest.raises(TypeError, match="routing: expected a RoutingResult"):
        layer(x, routing=(r.topk_ids, r.topk_weights))
    with pytest.raises(ValueError, match="routing, router_logits"):
        layer(x, routing=r, router_logits=np.zeros((5, 6), np.float32))
    bad_k = zm.RoutingResult(r.topk_ids[:, :1], r.topk_weights[:, :1], r.expert_counts)
    with pytest.raises(ValueError, match="routing.topk_ids"):
        layer(x, routing=bad_k)


@pytest.mark.parametrize("name,bad,exc", [
    ("w13", np.zeros((4, 8, 16), np.float32), ValueError),
    ("w2", np.zeros((4, 8, 16), np.float32), ValueError),
    ("router_weight", np.zeros((5, 16), np.float32), ValueError),
    ("router_weight", np.zeros((6, 16), np.int64), TypeError),
    ("e_score_correction_bias", np.zeros(5, np.float32), ValueError),
    ("router_bias", np.zeros((6, 1), np.float32), ValueError),
])
def test_from_weights_errors(name, bad, exc, rng):
    w = random_layer_weights(rng, CFG)
    w[name] = bad
    with pytest.raises(exc, match=name):
        zm.ZeroExpertMoE.from_weights(CFG, **w)


def test_from_weights_needs_constant_parameters(rng):
    cfg = zm.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, num_zero_experts=2,
                       top_k=2, zero_expert_type="constant", dtype="float32")
    w = random_layer_weights(rng, cfg)
    del w["const_gate"]
    with pytest.raises(ValueError, match="const_vec, const_gate"):
        zm.ZeroExpertMoE.from_weights(cfg, **w)


def test_layer_construction_errors():
    with pytest.raises(TypeError, match="config"):
        zm.ZeroExpertMoE({"hidden_size": 4})
    with pytest.raises(ValueError, match="device"):
        zm.ZeroExpertMoE(CFG, device="tpu")
    with pytest.raises(ValueError, match="max_chunk_tokens"):
        zm.ZeroExpertMoE(CFG, device="cpu", max_chunk_tokens=0)
    with pytest.raises(ValueError, match="expert_strategy: expected one of"):
        zm.ZeroExpertMoE(CFG, device="cpu", expert_strategy="fast")
    with pytest.raises(ValueError, match="router_gemm: expected one of"):
        zm.ZeroExpertMoE(CFG, device="cpu", router_gemm="tf32")
    with pytest.raises(TypeError, match="deterministic: expected a bool"):
        zm.ZeroExpertMoE(CFG, device="cpu", deterministic="yes")
    with pytest.raises(ValueError, match="deterministic=True picks its own kernels"):
        zm.ZeroExpertMoE(CFG, device="cpu", deterministic=True, expert_strategy="padded")
    with pytest.raises(ValueError, match="deterministic=True picks its own kernels"):
        zm.ZeroExpertMoE(CFG, device="cpu", deterministic=True, router_gemm="fp32")


@pytest.mark.skipif(gpu_available(), reason="only without a GPU")
def test_cuda_layer_without_gpu_says_so():
    with pytest.raises(RuntimeError, match="device='cpu'"):
        zm.ZeroExpertMoE(CFG, device="cuda")


def test_route_op_errors(rng):
    L = rng.standard_normal((3, 6)).astype(np.float32)
    with pytest.raises(TypeError, match="router_logits: expected float32"):
        ops.route(L.astype(np.float64), 2)
    with pytest.raises(ValueError, match="router_logits: expected a 2-D"):
        ops.route(L[0], 2)
    with pytest.raises(ValueError, match="top_k"):
        ops.route(L, 7)
    with pytest.raises(ValueError, match="scoring_func"):
        ops.route(L, 2, scoring_func="tanh")
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        ops.route(L, 2, e_score_correction_bias=np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="num_expert_group"):
        ops.route(L, 2, num_expert_group=4, topk_group=1)
    with pytest.raises(ValueError, match="num_expert_group and topk_group"):
        ops.route(L, 2, num_expert_group=2)


def test_expert_and_combine_op_errors(layer, x, rng):
    ids = np.zeros((5, 2), np.int32)
    w = np.ones((5, 2), np.float32)
    with pytest.raises(TypeError, match="w13: expected dtype float32"):
        ops.expert_mlp(x, ids, layer.w13.astype(np.float16), layer.w2)
    with pytest.raises(ValueError, match="w2: expected shape"):
        ops.expert_mlp(x, ids, layer.w13, layer.w2[:, :3])
    with pytest.raises(ValueError, match="topk_ids: expected shape"):
        ops.expert_mlp(x, ids[:3], layer.w13, layer.w2)
    with pytest.raises(ValueError, match="strategy: expected one of"):
        ops.expert_mlp(x, ids, layer.w13, layer.w2, strategy="gemv")
    with pytest.raises(TypeError, match="topk_ids: expected an integer"):
        ops.combine(x, w, w, 4, "identity")
    with pytest.raises(ValueError, match="topk_weights: expected shape"):
        ops.combine(x, ids, w[:, :1], 4, "identity")
    with pytest.raises(TypeError, match="x: expected bfloat16, float16 or float32"):
        ops.combine(x.astype(np.float64), ids, w, 4, "identity")
