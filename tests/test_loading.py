"""Weight loading (fused, per expert, state dicts), examples, and import hygiene, on the CPU."""
import os
import subprocess
import sys

import numpy as np
import pytest

import zeromoe_cupy as zm

from helpers import random_layer_weights, random_x

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = zm.MoEConfig(hidden_size=24, intermediate_size=12, num_experts=5, num_zero_experts=3,
                   top_k=3, use_correction_bias=True, dtype="float32")


def _per_expert(w):
    I = CFG.intermediate_size
    return ([w["w13"][e, :I] for e in range(CFG.num_experts)],
            [w["w13"][e, I:] for e in range(CFG.num_experts)],
            [w["w2"][e] for e in range(CFG.num_experts)])


def test_from_expert_weights_matches_fused(rng):
    w = random_layer_weights(rng, CFG, bias_scale=0.05)
    fused = zm.ZeroExpertMoE.from_weights(CFG, **w)
    gate, up, down = _per_expert(w)
    split = zm.ZeroExpertMoE.from_expert_weights(
        CFG, w["router_weight"], gate, up, down,
        e_score_correction_bias=w["e_score_correction_bias"])
    x = random_x(rng, 11, 24, "float32")
    np.testing.assert_array_equal(split(x), fused(x))


@pytest.mark.parametrize("layout", ["fused", "longcat", "mixtral"])
def test_from_state_dict_layouts(layout, rng):
    w = random_layer_weights(rng, CFG, bias_scale=0.05)
    prefix = "model.layers.3.mlp."
    sd = {prefix + "router.classifier.weight": w["router_weight"],
          prefix + "router.e_score_correction_bias": w["e_score_correction_bias"],
          "unrelated.weight": np.zeros(3)}
    gate, up, down = _per_expert(w)
    if layout == "fused":
        sd[prefix + "experts.w13_weight"] = w["w13"]
        sd[prefix + "experts.w2_weight"] = w["w2"]
    else:
        names = ("gate_proj", "up_proj", "down_proj") if layout == "longcat" else ("w1", "w3", "w2")
        for e in range(CFG.num_experts):
            for name, mats in zip(names, (gate, up, down)):
                sd[f"{prefix}experts.{e}.{name}.weight"] = mats[e]
    layer = zm.ZeroExpertMoE.from_state_dict(CFG, sd, prefix=prefix, expert_strategy="grouped",
                                             router_gemm="fp32")
    assert (layer.expert_strategy, layer.router_gemm) == ("grouped", "fp32")  # options pass on
    x = random_x(rng, 9, 24, "float32")
    np.testing.assert_array_equal(layer(x), zm.ZeroExpertMoE.from_weights(CFG, **w)(x))
    with pytest.raises(ValueError, match="expert_strategy"):
        zm.ZeroExpertMoE.from_state_dict(CFG, sd, prefix=prefix, expert_strategy="nope")


def test_state_dict_errors_name_what_is_missing(rng):
    w = random_layer_weights(rng, CFG)
    with pytest.raises(ValueError, match="no router weight"):
        zm.ZeroExpertMoE.from_state_dict(CFG, {}, prefix="p.")
    sd = {"router.classifier.weight": w["router_weight"],
          "experts.0.gate_proj.weight": w["w13"][0, :12]}
    with pytest.raises(ValueError, match="no gate matrices"):
        zm.ZeroExpertMoE.from_state_dict(CFG, sd)
    gate, up, down = _per_expert(w)
    with pytest.raises(ValueError, match="down: expected 5 matrices"):
        zm.ZeroExpertMoE.from_expert_weights(CFG, w["router_weight"], gate, up, down[:4])
    with pytest.raises(ValueError, match=r"up\[2\]: expected shape"):
        zm.ZeroExpertMoE.from_expert_weights(CFG, w["router_weight"], gate,
                                             up[:2] + [up[2][:5]] + up[3:], down)


@pytest.mark.parametrize("role", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.bool_, np.complex64])
def test_per_expert_matrices_of_a_non_float_dtype_are_refused(rng, role, dtype):
    # (from_weights refuses such a w13 / w2; stacked with float matrices they were cast)
    w = random_layer_weights(rng, CFG)
    mats = [list(m) for m in _per_expert(w)]
    mats[role][3] = mats[role][3].astype(dtype)
    name = ("gate", "up", "down")[role]
    with pytest.raises(TypeError, match=rf"^{name}\[3\]: expected a floating-point matrix"):
        zm.ZeroExpertMoE.from_expert_weights(CFG, w["router_weight"], *mats)


@pytest.mark.parametrize("bad", [None, 3, iter([])])
def test_per_expert_matrices_must_come_as_a_sequence(rng, bad):
    w = random_layer_weights(rng, CFG)
    gate, up, down = _per_expert(w)
    with pytest.raises(TypeError, match="^up: expected a sequence of 5 matrices"):
        zm.ZeroExpertMoE.from_expert_weights(CFG, w["router_weight"], gate, bad, down)


def test_package_never_imports_torch_on_its_own():
    code = ("import sys, numpy as np, zeromoe_cupy as zm\n"
            "l = zm.ZeroExpertMoE(zm.MoEConfig.preset('tiny'), device='cpu')\n"
            "l(np.ones((3, 256), np.float32)); zm.cli.info() if hasattr(zm, 'cli') else None\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("example", ["quickstart.py", "moepp_layer.py"])
def test_cpu_examples_run_and_pass_their_checks(example):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", example)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "relative error against the float64 reference" in res.stdout and "ok" in res.stdout
