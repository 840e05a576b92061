"""Every bad input raises ValueError (shapes, values) or TypeError (dtypes, array kinds),
naming the argument."""
import re
import warnings

import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy import graphs, ops
from zeromoe_cupy.parallel import launch
from zeromoe_cupy._arrays import gpu_available
from zeromoe_cupy.routing import split_bf16

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


def test_unknown_keywords_name_the_method_called(rng, tmp_path):
    w = random_layer_weights(rng, CFG)
    with pytest.raises(TypeError, match=r"from_weights: unexpected keyword argument\(s\) "
                                        r"\['wgate'\]"):
        zm.ZeroExpertMoE.from_weights(CFG, wgate=1, **w)
    with pytest.raises(TypeError, match=r"from_pretrained: unexpected keyword argument\(s\) "
                                        r"\['foo'\]"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=0, device="cpu", foo=1)


def test_from_weights_needs_constant_parameters(rng):
    cfg = zm.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, num_zero_experts=2,
                       top_k=2, zero_expert_type="constant", dtype="float32")
    w = random_layer_weights(rng, cfg)
    del w["const_gate"]
    with pytest.raises(ValueError, match="const_vec, const_gate"):
        zm.ZeroExpertMoE.from_weights(cfg, **w)


def test_from_weights_refuses_arrays_its_config_does_not_use(rng):
    # constant-expert parameters under a config without constant experts would be ignored
    w = random_layer_weights(rng, CFG)
    for k, shape in (("const_vec", (2, 16)), ("const_gate", (2, 2, 16))):
        a = rng.standard_normal(shape).astype(np.float32)
        with pytest.raises(ValueError, match=f"{k}: the config has no 'constant'"):
            zm.ZeroExpertMoE.from_weights(CFG, **{**w, k: a})


BAD_OPTIONS = [("max_chunk_tokens", 0, ValueError), ("max_chunk_tokens", -1, ValueError),
               ("max_chunk_tokens", 2.5, TypeError), ("expert_strategy", "bogus", ValueError),
               ("router_gemm", "tf32", ValueError), ("deterministic", "yes", TypeError)]


@pytest.mark.parametrize("name, bad, exc", BAD_OPTIONS)
def test_options_assigned_after_construction_are_checked_as_the_constructor_does(
        layer, x, name, bad, exc):
    with pytest.raises(exc, match=f"^{name}: expected"):
        zm.ZeroExpertMoE(CFG, device="cpu", **{name: bad})
    y = layer(x)
    held = getattr(layer, name)
    with pytest.raises(exc, match=f"^{name}: expected"):
        setattr(layer, name, bad)
    assert getattr(layer, name) == held
    np.testing.assert_array_equal(layer(x), y)


def test_deterministic_assigned_after_construction_runs_its_kernels(layer, x):
    layer.expert_strategy = "pairs"
    with pytest.raises(ValueError, match="deterministic=True picks its own kernels"):
        layer.deterministic = True
    layer.expert_strategy = "auto"
    layer.deterministic = True
    assert layer.options() == zm.ZeroExpertMoE(CFG, device="cpu", deterministic=True).options()
    with pytest.raises(ValueError, match="deterministic=True picks its own kernels"):
        layer.expert_strategy = "grouped"


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
    with pytest.raises(TypeError, match="router_logits: expected a floating-point array"):
        ops.route(L.astype(np.int32), 2)
    # any float dtype is used as fp32 (docs/spec.md step 1)
    np.testing.assert_array_equal(ops.route(L.astype(np.float64), 2).topk_ids,
                                  ops.route(L.astype(np.float64).astype(np.float32), 2).topk_ids)
    with pytest.raises(ValueError, match="router_logits: expected a 2-D"):
        ops.route(L[0], 2)
    with pytest.raises(ValueError, match="top_k"):
        ops.route(L, 7)
    with pytest.raises(TypeError, match="top_k"):
        ops.route(L, 2.0)
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


# --- caller-supplied routing ------------------------------------------------------------------
@pytest.mark.parametrize("bad_id", [-1, -100, 6, 7, 2**31 - 1])
def test_routing_ids_out_of_range_are_refused(layer, x, bad_id):
    r = layer.route(x)
    ids = r.topk_ids.copy()
    ids[3, 1] = bad_id
    before = ids.copy()
    with pytest.raises(ValueError, match=r"routing.topk_ids: expected ids in \[0, 6\)"):
        layer(x, routing=zm.RoutingResult(ids, r.topk_weights, r.expert_counts))
    np.testing.assert_array_equal(ids, before)


@pytest.mark.parametrize("field", ["topk_ids", "topk_weights"])
def test_routing_of_lists_is_a_type_error(layer, x, field):
    r = layer.route(x)
    bad = r._replace(**{field: getattr(r, field).tolist()})
    with pytest.raises(TypeError, match=f"routing.{field}: expected a NumPy/CuPy array"):
        layer(x, routing=bad)


def test_routing_dtypes_are_checked(layer, x):
    r = layer.route(x)
    with pytest.raises(TypeError, match="routing.topk_ids: expected an integer array"):
        layer(x, routing=r._replace(topk_ids=r.topk_ids.astype(np.float32)))
    with pytest.raises(TypeError, match="routing.topk_weights: expected a floating-point"):
        layer(x, routing=r._replace(topk_weights=r.topk_weights.astype(np.int32)))
    with pytest.raises(ValueError, match=r"routing.topk_weights: expected shape \(5, 2\)"):
        layer(x, routing=r._replace(topk_weights=r.topk_weights[:, :1]))


# --- layer arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed,exc", [(-1, ValueError), ("a", TypeError), (1.5, TypeError),
                                      (True, TypeError), (None, TypeError)])
def test_seed_errors_name_seed(seed, exc):
    with pytest.raises(exc, match="seed: expected an int >= 0"):
        zm.ZeroExpertMoE(CFG, seed=seed, device="cpu")


def test_numpy_integer_seed_is_a_seed():
    a = zm.ZeroExpertMoE(CFG, seed=np.int64(3), device="cpu")
    b = zm.ZeroExpertMoE(CFG, seed=3, device="cpu")
    np.testing.assert_array_equal(a.w13, b.w13)


@pytest.mark.skipif(gpu_available(), reason="only without a GPU")
def test_from_weights_to_cuda_without_gpu_says_so(rng):
    with pytest.raises(RuntimeError, match="device='cuda': no usable CUDA GPU"):
        zm.ZeroExpertMoE.from_weights(CFG, **random_layer_weights(rng, CFG), device="cuda")


def test_from_weights_device_errors(rng):
    with pytest.raises(ValueError, match="device: expected 'auto', 'cuda' or 'cpu'"):
        zm.ZeroExpertMoE.from_weights(CFG, **random_layer_weights(rng, CFG), device="gpu")


# --- ops -------------------------------------------------------------------------------------
def test_router_logits_op_errors(rng):
    x = random_x(rng, 3, 16, "float32")
    wr = rng.standard_normal((6, 16)).astype(np.float32)
    with pytest.raises(ValueError, match=r"router_weight: expected shape \[E\+Z, H=16\]"):
        ops.router_logits(x, wr[:, :15])
    with pytest.raises(ValueError, match="router_weight: expected shape"):
        ops.router_logits(x, wr[0])
    with pytest.raises(TypeError, match="x: expected bfloat16, float16 or float32, got int"):
        ops.router_logits(np.ones((3, 16), np.int64), wr)
    with pytest.raises(TypeError, match="x: expected bfloat16, float16 or float32"):
        ops.router_logits(x.astype(np.float64), wr)
    with pytest.raises(ValueError, match="x: expected a 2-D array"):
        ops.router_logits(x[0], wr)
    with pytest.raises(TypeError, match="router_weight: expected a floating-point"):
        ops.router_logits(x, wr.astype(np.int32))
    with pytest.raises(ValueError, match=r"router_bias: expected shape \(6,\)"):
        ops.router_logits(x, wr, np.zeros(5, np.float32))
    with pytest.raises(TypeError, match="router_weight: expected a NumPy/CuPy array"):
        ops.router_logits(x, wr.tolist())
    with pytest.raises(TypeError, match="fixed_order: expected a bool"):
        ops.router_logits(x, wr, fixed_order="yes")
    for bad in (5, np.zeros((3, 6, 16), np.float32)):
        with pytest.raises(TypeError, match="weight_parts: expected a tuple of three"):
            ops.router_logits(x, wr, weight_parts=bad)
    parts = split_bf16(wr)
    with pytest.raises(ValueError, match="weight_parts: expected three arrays"):
        ops.router_logits(x, wr, weight_parts=parts[:2])
    with pytest.raises(TypeError, match=r"weight_parts\[0\]: expected an array"):
        ops.router_logits(x, wr, weight_parts=(None, None, None))
    with pytest.raises(TypeError, match=r"weight_parts\[1\]: expected a NumPy/CuPy array"):
        ops.router_logits(x, wr, weight_parts=(parts[0], [[1.0]], parts[2]))
    with pytest.raises(TypeError, match=r"weight_parts\[2\]: expected a bfloat16 array"):
        ops.router_logits(x, wr, weight_parts=parts[:2] + (wr,))
    with pytest.raises(ValueError, match=r"weight_parts\[0\]: expected shape \(6, 16\)"):
        ops.router_logits(x, wr, weight_parts=(parts[0][:5],) + parts[1:])


def test_route_op_scalar_errors(rng):
    L = rng.standard_normal((3, 6)).astype(np.float32)
    with pytest.raises(TypeError, match="renormalize: expected a bool"):
        ops.route(L, 2, renormalize="no")
    with pytest.raises(ValueError, match="routed_scaling_factor: expected a finite"):
        ops.route(L, 2, routed_scaling_factor=float("nan"))
    with pytest.raises(ValueError, match="routed_scaling_factor: expected a finite"):
        ops.route(L, 2, routed_scaling_factor=float("inf"))
    with pytest.raises(TypeError, match="routed_scaling_factor: expected a float"):
        ops.route(L, 2, routed_scaling_factor="2")
    with pytest.raises(TypeError, match="num_expert_group: expected an int"):
        ops.route(L, 2, num_expert_group=2.0, topk_group=1)
    with pytest.raises(TypeError, match="e_score_correction_bias: expected a floating-point"):
        ops.route(L, 2, e_score_correction_bias=np.zeros(6, np.int32))
    with pytest.raises(TypeError, match="router_logits: expected a floating-point"):
        ops.route(L.astype(np.int32), 2)


def test_combine_op_argument_errors(layer, x):
    ids = np.array([[0, 4]] * 5, np.int32)
    w = np.ones((5, 2), np.float32)
    with pytest.raises(ValueError, match="num_experts: expected an int >= 0, got -1"):
        ops.combine(x, ids, w, -1, "identity")
    with pytest.raises(TypeError, match="num_experts: expected an int"):
        ops.combine(x, ids, w, 4.5, "identity")
    with pytest.raises(ValueError, match="num_zero_experts: expected an int >= 0"):
        ops.combine(x, ids, w, 4, "identity", num_zero_experts=-2)
    with pytest.raises(TypeError, match="expert_output: expected the ExpertOutput"):
        ops.combine(x, ids, w, 4, "identity", expert_output=(1, 2, 3))
    with pytest.raises(TypeError, match="expert_output.rows: expected a NumPy/CuPy array"):
        ops.combine(x, ids, w, 4, "identity", expert_output=(1, 2))
    with pytest.raises(TypeError, match="expert_output: expected the ExpertOutput"):
        ops.combine(x, ids, w, 4, "identity", expert_output=np.zeros((2, 16), np.float32))
    # rows of a dtype combine does not take: TypeError; of the wrong width: ValueError
    slot_rows = np.array([[0, -1]] * 5, np.int32)
    H = x.shape[1]
    for dtype in (np.float64, np.int32, np.float16):
        with pytest.raises(TypeError, match="expert_output.rows: expected dtype"):
            ops.combine(x, ids, w, 4, "identity",
                        expert_output=(np.zeros((5, H), dtype), slot_rows))
    with pytest.raises(ValueError, match=rf"expert_output.rows: expected shape \[M, {H}\]"):
        ops.combine(x, ids, w, 4, "identity",
                    expert_output=(np.zeros((5, H + 1), np.float32), slot_rows))
    with pytest.raises(TypeError, match="zero_expert_type: expected one of"):
        ops.combine(x, ids, w, 4, None)
    with pytest.raises(TypeError, match="zero_expert_type: expected one of"):
        ops.zero_expert_output(x, ids, w, 4, None, num_zero_experts=2)
    with pytest.raises(TypeError, match="topk_ids: expected a NumPy/CuPy array"):
        ops.combine(x, ids.tolist(), w, 4, "identity")
    with pytest.raises(ValueError, match=r"topk_ids: expected ids in \[0, 6\)"):
        ops.combine(x, ids - 1, w, 4, "identity", num_zero_experts=2)
    for bad in (0, None, "no", 1):  # falsy values must not switch the check off quietly
        with pytest.raises(TypeError, match="check_ids: expected a bool"):
            ops.combine(x, ids, w, 4, "identity", check_ids=bad)
        with pytest.raises(TypeError, match="check_ids: expected a bool"):
            ops.zero_expert_output(x, ids, w, 4, "identity", check_ids=bad)


def test_expert_mlp_op_argument_errors(layer, x):
    ids = np.zeros((5, 2), np.int32)
    with pytest.raises(ValueError, match=r"expert_counts: expected shape \[>= E=4\]"):
        ops.expert_mlp(x, ids, layer.w13, layer.w2, expert_counts=np.zeros(3, np.int32))
    with pytest.raises(TypeError, match="expert_counts: expected an integer array"):
        ops.expert_mlp(x, ids, layer.w13, layer.w2, expert_counts=np.zeros(6, np.float32))
    with pytest.raises(TypeError, match="expert_counts: expected a NumPy/CuPy array"):
        ops.expert_mlp(x, ids, layer.w13, layer.w2, expert_counts=[0] * 6)
    with pytest.raises(TypeError, match="x: expected bfloat16, float16 or float32"):
        ops.expert_mlp(x.astype(np.int32), ids, layer.w13, layer.w2)


def test_constructors_name_a_config_that_is_not_one(rng):
    w = random_layer_weights(rng, CFG)
    per_expert = (w["w13"][:, :8], w["w13"][:, 8:], w["w2"])
    calls = [lambda c: zm.ZeroExpertMoE(c),
             lambda c: zm.ZeroExpertMoE.from_weights(c, **w),
             lambda c: zm.ZeroExpertMoE.from_expert_weights(c, w["router_weight"], *per_expert),
             lambda c: zm.ZeroExpertMoE.from_state_dict(c, {})]
    for call in calls:
        for bad in (None, CFG.to_dict(), "config"):
            with pytest.raises(TypeError, match="config: expected a MoEConfig"):
                call(bad)


def test_reference_checks_its_arguments_as_the_layer_does(layer, x, rng):
    r = layer.route(x)
    N = CFG.num_total_experts
    logits = rng.standard_normal((5, N)).astype(np.float32)
    for bad_id in (N, N + 3, -1):
        ids = r.topk_ids.copy()
        ids[rng.integers(5), rng.integers(2)] = bad_id
        with pytest.raises(ValueError, match=r"routing.topk_ids: expected ids in \[0, 6\)"):
            layer.reference(x, routing=(ids, r.topk_weights))
    with pytest.raises(ValueError, match="router_logits: expected shape"):
        layer.reference(x, router_logits=logits[:, :3])
    with pytest.raises(ValueError, match="routing, router_logits"):
        layer.reference(x, routing=r, router_logits=logits)
    with pytest.raises(TypeError, match="routing.topk_ids: expected an integer"):
        layer.reference(x, routing=(r.topk_ids.astype(np.float32), r.topk_weights))
    with pytest.raises(ValueError, match=r"routing.topk_ids: expected shape \(2, 2\)"):
        layer.reference(x[:2], routing=r)  # routing of 5 tokens for 2
    with pytest.raises(TypeError, match="routing: expected a RoutingResult or an"):
        layer.reference(x, routing=(r.topk_ids, r.topk_weights, r.expert_counts, 0))
    # what passes the checks still gives the layer's result
    y, _ = layer.reference(x, routing=(r.topk_ids, r.topk_weights))
    np.testing.assert_allclose(layer(x, routing=r), y, rtol=1e-4, atol=1e-5)


FP8_CFG = zm.MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, num_zero_experts=2,
                       top_k=2, dtype="bfloat16", use_correction_bias=True)


@pytest.mark.parametrize("fp8", [False, True])
def test_assigned_weights_are_checked(rng, fp8):
    cfg = FP8_CFG
    layer = zm.ZeroExpertMoE.from_weights(cfg, **random_layer_weights(rng, cfg), device="cpu")
    if fp8:
        layer = layer.quantize("fp8")
    w = layer.numpy_weights()
    names = [k for k, v in w.items() if v is not None]
    assert ("w13_scale_inv" in names) == fp8
    for k in names:
        a = w[k]
        with pytest.raises(ValueError, match=f"{k}: expected shape"):
            setattr(layer, k, np.zeros((1,) * a.ndim, a.dtype))
        with pytest.raises(ValueError, match=f"{k}: expected shape"):
            setattr(layer, k, a[..., :-1].copy())
        other = np.float64 if a.dtype == np.float32 else np.float32
        with pytest.raises(TypeError, match=f"{k}: expected dtype"):
            setattr(layer, k, a.astype(other))
        with pytest.raises(TypeError, match=k):
            setattr(layer, k, a.tolist())
        with pytest.raises(ValueError, match=f"{k}: this layer needs"):
            setattr(layer, k, None)
    for k in ("const_vec", "router_hidden_weight", "gate_map"):  # arrays the layer has not
        with pytest.raises(ValueError, match=f"{k}: this layer has no"):
            setattr(layer, k, np.zeros((6, 16), np.float32))
    with pytest.raises(ValueError, match="w2: expected a C-contiguous"):
        layer.w2 = np.asfortranarray(w["w2"])
    # nothing above reached the layer
    for k in names:
        np.testing.assert_array_equal(getattr(layer, k).view(np.uint8), w[k].view(np.uint8))


def _matrix(a):
    with warnings.catch_warnings():  # NumPy's own advice against np.matrix
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(a)


def test_array_subclasses_that_change_numpy_semantics_are_refused(layer, x):
    with pytest.raises(TypeError, match=r"x: .*numpy.matrix.*np.asarray\(x\)"):
        layer(_matrix(x))
    masked = np.ma.masked_array(x, mask=x > 1)
    with pytest.raises(TypeError, match=r"x: .*masked array.*x.filled"):
        layer(masked)
    with pytest.raises(TypeError, match="x: .*masked array"):
        ops.router_logits(np.ma.masked_array(x), layer.router_weight)
    with pytest.raises(TypeError, match="w13: .*numpy.matrix"):
        ops.expert_mlp(x, np.zeros((5, 1), np.int32), _matrix(layer.w13[0]), layer.w2)


class _Tagged(np.ndarray):
    """An ndarray subclass with its own reductions, as subclasses in the wild have."""

    def max(self, *args, **kwargs):
        raise AssertionError("the library reached a subclass method")

    sum = min = mean = max


def test_other_ndarray_subclasses_are_read_as_plain_views(layer, x, tmp_path):
    want = layer(x)
    mm = np.memmap(tmp_path / "x.bin", dtype=x.dtype, mode="w+", shape=x.shape)
    mm[:] = x
    tagged = x.copy().view(_Tagged)
    for xs in (mm, tagged):
        y = layer(xs)
        assert type(y) is np.ndarray
        np.testing.assert_array_equal(y, want)
    from zeromoe_cupy._arrays import as_array
    view = as_array(mm, "x")
    assert type(view) is np.ndarray and np.shares_memory(view, mm)  # zero-copy


def test_e4m3_weights_without_scales_name_the_scales(layer, x):
    from zeromoe_cupy.quant import quantize_weight
    ids = np.zeros((5, 1), np.int32)
    q13, s13 = quantize_weight(layer.w13, glu=True)
    q2, s2 = quantize_weight(layer.w2)
    for w13, w2 in ((q13, q2), (q13.view(np.uint8), q2.view(np.uint8)), (layer.w13, q2)):
        with pytest.raises(TypeError, match="w13_scale_inv and w2_scale_inv"):
            ops.expert_mlp(x, ids, w13, w2)
    with pytest.raises(TypeError, match=r"w13: expected dtype float32 \(x's\)"):
        ops.expert_mlp(x, ids, layer.w13.astype(np.float16), layer.w2)


def test_config_device_and_group_of_a_built_layer_are_fixed():
    import dataclasses
    layer = zm.ZeroExpertMoE(zm.MoEConfig.preset("tiny"), seed=0, device="cpu")
    for name, value in (("config", dataclasses.replace(layer.config, num_experts=4)),
                        ("device", "cuda"), ("group", None)):
        with pytest.raises(AttributeError, match=name):
            setattr(layer, name, value)


def test_combine_unchecked_ids_outside_the_experts_contribute_nothing(rng):
    # check_ids=False: ids beyond E+Z, or a num_experts below the rows' experts, never index
    # out of bounds on the CPU path (they add nothing).
    cfg = zm.MoEConfig.preset("tiny")
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cpu")
    x = rng.standard_normal((5, cfg.hidden_size)).astype(np.float32)
    r = layer.route(x)
    out = ops.expert_mlp(x, r.topk_ids, layer.w13, layer.w2)
    ids = r.topk_ids.copy()
    ids[0, 0] = 10 ** 6
    y = ops.combine(x, ids, r.topk_weights, cfg.num_experts, "identity", out,
                    num_zero_experts=cfg.num_zero_experts, check_ids=False)
    assert np.isfinite(y).all()
    y = ops.combine(x, r.topk_ids, r.topk_weights, 1, "identity", out, num_zero_experts=4,
                    check_ids=False)
    assert np.isfinite(y).all()


# --- integer arguments: one rule everywhere ----------------------------------------------------
def _combine(num_experts):
    x = np.ones((1, 4), np.float32)
    return ops.combine(x, np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32), num_experts,
                       "identity")


# (name in the message, a call taking the value, the smallest value it accepts)
INT_ARGUMENTS = [
    ("max_tokens", lambda v: graphs._sizes(v, None), 1),
    ("capture_sizes[1]", lambda v: graphs._sizes(None, (4, v)), 1),
    ("world_size", zm.parallel.local_groups, 1),
    ("nprocs", lambda v: launch.launch(v, ["-c", "pass"]), 1),
    ("max_chunk_tokens", lambda v: zm.ZeroExpertMoE(CFG, device="cpu", max_chunk_tokens=v), 1),
    ("seed", lambda v: zm.ZeroExpertMoE(CFG, device="cpu", seed=v), 0),
    ("top_k", lambda v: zm.MoEConfig(hidden_size=4, intermediate_size=4, num_experts=4,
                                     top_k=v), 1),
    ("num_experts", _combine, 0),
]
INT_IDS = [a[0] for a in INT_ARGUMENTS]


@pytest.mark.parametrize("name,call,minimum", INT_ARGUMENTS, ids=INT_IDS)
@pytest.mark.parametrize("bad", [True, 2.0, "2", np.float32(2), [2]])
def test_non_int_is_a_type_error_naming_the_argument(name, call, minimum, bad):
    with pytest.raises(TypeError, match=rf"^{re.escape(name)}: expected an int"):
        call(bad)


@pytest.mark.parametrize("name,call,minimum", INT_ARGUMENTS, ids=INT_IDS)
def test_int_out_of_range_is_a_value_error_naming_the_argument(name, call, minimum):
    for bad in (minimum - 1, np.int64(minimum - 5)):
        with pytest.raises(ValueError, match=rf"^{re.escape(name)}: expected an int >= {minimum}"):
            call(bad)


# --- found by a new user's tries ---------------------------------------------------------------
@pytest.mark.parametrize("tokens, exc", [(-1, ValueError), (1.5, TypeError), ("a", TypeError),
                                         (True, TypeError)])
def test_workspace_bytes_checks_tokens(layer, tokens, exc):
    with pytest.raises(exc, match="tokens"):
        layer.workspace_bytes(tokens)


@pytest.mark.parametrize("timeout, exc", [("5", TypeError), (True, TypeError), (None, TypeError),
                                          (0, ValueError), (-1.0, ValueError),
                                          (float("nan"), ValueError)])
def test_local_groups_timeout(timeout, exc):
    with pytest.raises(exc, match="timeout"):
        zm.parallel.local_groups(2, timeout=timeout)


def test_expert_mlp_names_both_weights_when_their_i_differs(layer, x):
    ids = np.zeros((5, 2), np.int32)
    with pytest.raises(ValueError, match=r"w13, w2: .*I = 5.*I = 8"):
        ops.expert_mlp(x, ids, layer.w13[:, :10], layer.w2)


@pytest.mark.parametrize("name, glu, where", [("w13", True, "expert 2 (up rows)"),
                                              ("w2", False, "matrix 1")])
def test_quantize_names_the_weight_and_matrix_with_a_non_finite_value(layer, name, glu, where):
    w = getattr(layer, name).copy()
    if glu:
        w[2, CFG.intermediate_size + 1, 3] = np.inf  # expert 2's up half
    else:
        w[1, 0, 0] = np.nan
    setattr(layer, name, w)
    with pytest.raises(ValueError, match=re.escape(f"{name}: expected finite weights, got NaN or "
                                                   f"Inf in {where}")):
        layer.quantize("fp8")


def test_from_state_dict_wants_a_mapping_and_hints_at_the_prefix_dot(layer):
    sd = {"m.router.classifier.weight": layer.router_weight, "m.experts.w13_weight": layer.w13,
          "m.experts.w2_weight": layer.w2}
    with pytest.raises(TypeError, match="state_dict"):
        zm.ZeroExpertMoE.from_state_dict(CFG, list(sd.items()), prefix="m.")
    with pytest.raises(ValueError, match=r"did you mean 'm\.'"):
        zm.ZeroExpertMoE.from_state_dict(CFG, sd, prefix="m")
    assert zm.ZeroExpertMoE.from_state_dict(CFG, sd, prefix="m.").w13.shape == layer.w13.shape


def test_flags_take_numpy_bools_as_the_config_does(layer, x):
    # np.bool_ (what comparisons of arrays give) is a bool here, as in MoEConfig's flags
    y, L = layer(x, return_router_logits=np.bool_(True))
    np.testing.assert_array_equal(y, layer(x))
    assert isinstance(layer(x, return_router_logits=np.bool_(False)), np.ndarray)
    det = zm.ZeroExpertMoE(CFG, device="cpu", deterministic=np.bool_(True))
    assert det.deterministic is True and det.expert_strategy == "fixed"
    with pytest.raises(TypeError, match="return_router_logits"):
        layer(x, return_router_logits=np.int64(1))
