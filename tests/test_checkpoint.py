"""Checkpoints on the CPU: Hugging Face configs, safetensors layers (per expert, fused,
sharded), save / load, pickle / deepcopy, and every kind of bad input."""
import copy
import json
import os
import pickle

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import zeromoe_cupy as zm
from zeromoe_cupy import checkpoint
from zeromoe_cupy._arrays import np_dtype

from helpers import hf_keys_read, random_x

H, I, E, Z, K = 24, 12, 5, 3, 3


def longcat_config(**over):
    d = dict(model_type="longcat_flash", hidden_size=H, expert_ffn_hidden_size=I,
             n_routed_experts=E, zero_expert_num=Z, moe_topk=K, routed_scaling_factor=2.5,
             num_layers=3, dtype="float32", ffn_hidden_size=40, vocab_size=10)
    d.update(over)
    return d


def deepseek_config(**over):
    d = dict(model_type="deepseek_v3", hidden_size=H, moe_intermediate_size=I,
             n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
             norm_topk_prob=True, routed_scaling_factor=2.0, first_k_dense_replace=1,
             num_hidden_layers=3, torch_dtype="float32", intermediate_size=40)
    d.update(over)
    return d


def layer_tensors(rng, n_router, E_, dtype, bias=True, H_=H, I_=I):
    """Random weights of one MoE layer (the test's own truth), fp32 router."""
    dt = np_dtype(dtype)
    w = {"router_weight": (rng.standard_normal((n_router, H_)) * H_ ** -0.5).astype(np.float32),
         "w13": (rng.standard_normal((E_, 2 * I_, H_)) * H_ ** -0.5).astype(np.float32).astype(dt),
         "w2": (rng.standard_normal((E_, H_, I_)) * I_ ** -0.5).astype(np.float32).astype(dt)}
    w["e_score_correction_bias"] = ((rng.standard_normal(n_router) * 0.05).astype(np.float32)
                                    if bias else None)
    return w


def hf_tensors(w, prefix, layout, router="router.classifier", n_unused=0):
    """A layer's tensors under Hugging Face names: per expert (with n_unused zero experts'
    gate/up entries, as transformers writes them) or fused (transformers v5 names)."""
    E_, I2 = w["w13"].shape[0], w["w13"].shape[1]
    corr = "router.e_score_correction_bias" if router.startswith("router") else \
        "gate.e_score_correction_bias"
    t = {f"{prefix}{router}.weight": w["router_weight"]}
    if w["e_score_correction_bias"] is not None:
        t[prefix + corr] = w["e_score_correction_bias"]
    if layout == "fused":
        extra = np.zeros((n_unused,) + w["w13"].shape[1:], w["w13"].dtype)
        t[prefix + "experts.gate_up_proj"] = np.concatenate([w["w13"], extra])
        t[prefix + "experts.down_proj"] = w["w2"]
    else:
        for e in range(E_ + n_unused):
            src = w["w13"][e] if e < E_ else np.ones_like(w["w13"][0])
            t[f"{prefix}experts.{e}.gate_proj.weight"] = np.ascontiguousarray(src[:I2 // 2])
            t[f"{prefix}experts.{e}.up_proj.weight"] = np.ascontiguousarray(src[I2 // 2:])
            if e < E_:
                t[f"{prefix}experts.{e}.down_proj.weight"] = w["w2"][e]
    return t


def write_checkpoint(path, config, tensors, shards=1):
    """config.json plus model.safetensors, or `shards` files and an index."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, os.path.join(path, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def reference_y(cfg, w, x):
    return zm.reference.forward(
        x, w["router_weight"], w["w13"], w["w2"], top_k=cfg.top_k, num_experts=cfg.num_experts,
        zero_expert_type=cfg.zero_types, scoring_func=cfg.scoring_func,
        correction_bias=w["e_score_correction_bias"], router_bias=w.get("router_bias"),
        renormalize=cfg.renormalize, routed_scaling_factor=cfg.routed_scaling_factor,
        num_expert_group=cfg.num_expert_group, topk_group=cfg.topk_group)[0]


TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 5e-3}


# --- configs ----------------------------------------------------------------------------------
def test_from_hf_config_longcat_and_deepseek_keys(tmp_path):
    c = zm.MoEConfig.from_hf_config(longcat_config(zero_expert_type="zero"))
    assert (c.hidden_size, c.intermediate_size, c.num_experts, c.num_zero_experts, c.top_k) == \
        (H, I, E, Z, K)
    assert (c.scoring_func, c.renormalize, c.use_correction_bias, c.routed_scaling_factor,
            c.zero_types, c.dtype, c.quantization) == \
        ("softmax", False, True, 2.5, ("zero",) * Z, "float32", None)
    d = zm.MoEConfig.from_hf_config(deepseek_config(torch_dtype="bfloat16"))
    assert (d.num_experts, d.num_zero_experts, d.top_k, d.scoring_func, d.renormalize,
            d.num_expert_group, d.topk_group, d.intermediate_size, d.dtype) == \
        (8, 0, 3, "sigmoid", True, 4, 2, I, "bfloat16")
    # Missing keys take the transformers classes' defaults: the published shapes.
    full = zm.MoEConfig.from_hf_config({"model_type": "longcat_flash"})
    assert full == zm.MoEConfig.preset("longcat-flash")
    # A directory or a config.json path reads the same.
    with open(tmp_path / "config.json", "w") as f:
        json.dump(longcat_config(), f)
    assert zm.MoEConfig.from_hf_config(str(tmp_path)) == zm.MoEConfig.from_hf_config(
        tmp_path / "config.json") == zm.MoEConfig.from_hf_config(longcat_config())


def test_from_hf_config_quantization_and_dense_layers():
    q = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
         "activation_scheme": "dynamic"}
    c = zm.MoEConfig.from_hf_config(longcat_config(quantization_config=q, dtype="bfloat16"))
    assert (c.quantization, c.weight_block_size, c.dtype) == ("fp8", (128, 128), "bfloat16")
    for bad in ({**q, "weight_block_size": [64, 64]}, {**q, "fmt": "e5m2"},
                {**q, "activation_scheme": "static"}, {"quant_method": "gptq"}):
        with pytest.raises(ValueError, match="quantization_config"):
            zm.MoEConfig.from_hf_config(longcat_config(quantization_config=bad))
    from zeromoe_cupy.config import parse_hf_config
    m = parse_hf_config(deepseek_config(first_k_dense_replace=2, num_hidden_layers=6,
                                        moe_layer_freq=2))
    assert (m.num_layers, m.dense_layers) == (6, (0, 1, 3, 5))


@pytest.mark.parametrize("d, kind, match", [
    ({"model_type": "llama"}, ValueError, "expected one of .*deepseek_v3.*longcat_flash"),
    ({}, ValueError, "model_type"),
    ({"model_type": ["longcat_flash"]}, ValueError, "model_type"),
    ({"model_type": {"a": 1}}, ValueError, "model_type"),
    (longcat_config(dtype="float64"), ValueError, "dtype"),
    (longcat_config(zero_expert_type="copy"), ValueError, "zero_expert_type"),
    # no constant-expert tensors in a LongCat checkpoint: refused when the config is read
    (longcat_config(zero_expert_type="constant"), ValueError, "zero_expert_type"),
    (deepseek_config(moe_layer_freq=0), ValueError, "moe_layer_freq"),
    (deepseek_config(topk_method="greedy"), ValueError, "topk_method"),
    (longcat_config(moe_topk=2.5), TypeError, "moe_topk"),  # a float where an int belongs
    (longcat_config(hidden_size="6144"), TypeError, "hidden_size"),
    (longcat_config(router_bias="false"), TypeError, "router_bias"),  # a str where a bool belongs
    (deepseek_config(norm_topk_prob=1), TypeError, "norm_topk_prob"),
    ({"model_type": "MoE++", "moe_2layer_gate": 0}, TypeError, "moe_2layer_gate"),
    (longcat_config(dtype=5), TypeError, "dtype"),
    (longcat_config(dtype=None, torch_dtype=5), TypeError, "'torch_dtype'"),  # dtype null
    (longcat_config(dtype=None, torch_dtype="float64"), ValueError, "'torch_dtype'.*float64"),
    (longcat_config(quantization_config={"quant_method": "fp8", "weight_block_size": 128}),
     ValueError, "quantization_config"),
    (deepseek_config(torch_dtype=5), TypeError, "torch_dtype"),
    (longcat_config(moe_topk=E + Z + 1), ValueError, "top_k"),
    (deepseek_config(num_experts_per_tok=None), ValueError, "num_experts_per_tok"),
    (deepseek_config(scoring_func="relu"), ValueError, "scoring_func"),
    (deepseek_config(n_group=3), ValueError, "num_expert_group"),
])
def test_from_hf_config_bad_values(d, kind, match):
    with pytest.raises(kind, match=match):
        zm.MoEConfig.from_hf_config(d)


# Every branch read: MoE++ with logits normalization reads moe_gate_norm_std too.
MOEPP = dict(model_type="MoE++", hidden_size=H, intermediate_size=I, num_experts=[9],
             num_hidden_layers=2, moe_use_logits_norm=True, moe_gate_norm_std=1.0)
NULL_IS_ABSENT = {"dtype", "torch_dtype", "quantization_config"}  # as in transformers


@pytest.mark.parametrize("config", [longcat_config(), deepseek_config(), MOEPP],
                         ids=["longcat_flash", "deepseek_v3", "MoE++"])
def test_from_hf_config_null_key_is_an_error_naming_key_and_file(tmp_path, config):
    keys = hf_keys_read(config) - NULL_IS_ABSENT
    assert "hidden_size" in keys and len(keys) >= 8  # the recording saw the parser's reads
    path = tmp_path / "config.json"
    for key in sorted(keys):
        path.write_text(json.dumps({**config, key: None}))
        with pytest.raises(ValueError, match=rf"^{path}: key '{key}': expected "):
            zm.MoEConfig.from_hf_config(path)
    for key in NULL_IS_ABSENT:  # null means absent: the same config
        absent = {k: v for k, v in config.items() if k != key}
        assert zm.MoEConfig.from_hf_config({**config, key: None}) == \
            zm.MoEConfig.from_hf_config(absent)


def test_from_hf_config_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        zm.MoEConfig.from_hf_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        zm.MoEConfig.from_hf_config(tmp_path / "nope.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        zm.MoEConfig.from_hf_config(str(tmp_path))
    with pytest.raises(TypeError, match="path_or_dict"):
        zm.MoEConfig.from_hf_config(3)


@pytest.mark.parametrize("cfg", [
    zm.MoEConfig.preset("tiny"),
    zm.MoEConfig.preset("moe++-7b"),
    zm.MoEConfig.preset("longcat-flash", quantization="fp8"),
    zm.MoEConfig(hidden_size=8, intermediate_size=4, num_experts=6, num_zero_experts=2,
                 top_k=3, scoring_func="sigmoid", renormalize=True, routed_scaling_factor=2.5,
                 num_expert_group=4, topk_group=2, dtype="float16"),
])
def test_config_dict_round_trip(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    back = zm.MoEConfig.from_dict(d)
    assert back == cfg and back.zero_types == cfg.zero_types
    assert back.weight_block_size == (128, 128)
    with pytest.raises(TypeError, match="unknown key"):
        zm.MoEConfig.from_dict({**d, "hiden_size": 3})
    with pytest.raises(ValueError, match="weight_block_size"):
        zm.MoEConfig.from_dict({**d, "weight_block_size": [64, 128]})
    with pytest.raises(ValueError, match="quantization"):
        zm.MoEConfig.from_dict({**d, "quantization": "int4"})


# --- from_pretrained --------------------------------------------------------------------------
@pytest.mark.parametrize("layout, shards, dtype, n_unused", [
    ("per_expert", 1, "float32", Z),   # transformers' save_pretrained: zero experts' gate/up too
    ("per_expert", 1, "bfloat16", 0),
    ("per_expert", 3, "float32", 0),
    ("fused", 1, "float32", Z),        # gate_up_proj [E+Z, 2I, H]
    ("fused", 2, "float16", 0),        # gate_up_proj [E, 2I, H]
])
def test_from_pretrained_longcat(tmp_path, rng, layout, shards, dtype, n_unused):
    L = 1
    w = layer_tensors(rng, E + Z, E, dtype)
    tensors = hf_tensors(w, f"model.layers.{L}.mlp.", layout, n_unused=n_unused)
    other = layer_tensors(rng, E + Z, E, dtype)  # another layer: must not be picked up
    tensors.update(hf_tensors(other, "model.layers.0.mlp.", layout, n_unused=n_unused))
    tensors["model.embed_tokens.weight"] = rng.standard_normal((10, H)).astype(np.float32)
    write_checkpoint(tmp_path, longcat_config(dtype=dtype), tensors, shards)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    layer = zm.ZeroExpertMoE.from_pretrained(str(tmp_path), layer=L, device="cpu",
                                             expert_strategy="grouped")
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # wrote nothing
    assert layer.expert_strategy == "grouped" and layer.config.dtype == dtype
    got = layer.numpy_weights()
    for k in ("router_weight", "w13", "w2", "e_score_correction_bias"):
        np.testing.assert_array_equal(got[k], w[k])
    x = random_x(rng, 17, H, dtype)
    err = zm.reference.relative_error(layer(x), reference_y(layer.config, w, x))
    assert err <= TOL[dtype]


def test_from_pretrained_deepseek_and_dtype_override(tmp_path, rng):
    w = layer_tensors(rng, 8, 8, "bfloat16")
    tensors = hf_tensors(w, "model.layers.2.mlp.", "per_expert", router="gate")
    tensors["model.layers.2.mlp.shared_experts.gate_proj.weight"] = np.ones((I, H), np.float32)
    tensors["model.layers.0.mlp.gate_proj.weight"] = np.ones((40, H), np.float32)  # dense layer
    write_checkpoint(tmp_path, deepseek_config(torch_dtype="bfloat16"), tensors, shards=2)
    layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=2, device="cpu", dtype="float32")
    assert layer.config.dtype == "float32" and layer.w13.dtype == np.float32
    cfg = layer.config
    assert (cfg.scoring_func, cfg.renormalize, cfg.num_expert_group) == ("sigmoid", True, 4)
    w32 = {k: None if v is None else v.astype(np.float32) for k, v in w.items()}
    x = random_x(rng, 13, H, "float32")
    assert zm.reference.relative_error(layer(x), reference_y(cfg, w32, x)) <= 1e-5
    with pytest.raises(ValueError, match="model.layers.0 .*dense"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=0, device="cpu")


def test_from_pretrained_router_bias_is_added(tmp_path, rng):
    w = layer_tensors(rng, E + Z, E, "float32")
    w["router_bias"] = (rng.standard_normal(E + Z) * 0.5).astype(np.float32)
    tensors = hf_tensors(w, "model.layers.0.mlp.", "per_expert")
    tensors["model.layers.0.mlp.router.classifier.bias"] = w["router_bias"]
    write_checkpoint(tmp_path, longcat_config(router_bias=True), tensors)
    layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=0, device="cpu")
    np.testing.assert_array_equal(layer.router_bias, w["router_bias"])
    x = random_x(rng, 9, H, "float32")
    assert zm.reference.relative_error(layer(x), reference_y(layer.config, w, x)) <= 1e-5
    # router_bias false (or absent): a bias tensor in the file is ignored, as transformers does
    for config in (longcat_config(router_bias=False), longcat_config()):
        write_checkpoint(tmp_path, config, tensors)
        layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=0, device="cpu")
        assert layer.router_bias is None
        w_no_bias = {k: v for k, v in w.items() if k != "router_bias"}
        assert zm.reference.relative_error(layer(x), reference_y(layer.config, w_no_bias, x)) \
            <= 1e-5
    del tensors["model.layers.0.mlp.router.classifier.bias"]
    write_checkpoint(tmp_path, longcat_config(router_bias=True), tensors)
    with pytest.raises(ValueError, match="router_bias"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=0, device="cpu")


def test_from_pretrained_deepseek_ignores_a_gate_bias(tmp_path, rng):
    # DeepSeek-V3's router has no bias: a stray gate.bias must not change the routing
    w = layer_tensors(rng, 8, 8, "float32")
    tensors = hf_tensors(w, "model.layers.2.mlp.", "per_expert", router="gate")
    tensors["model.layers.2.mlp.gate.bias"] = (rng.standard_normal(8) * 5).astype(np.float32)
    write_checkpoint(tmp_path, deepseek_config(), tensors)
    layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=2, device="cpu")
    assert layer.router_bias is None
    x = random_x(rng, 13, H, "float32")
    assert zm.reference.relative_error(layer(x), reference_y(layer.config, w, x)) <= 1e-5


def test_from_pretrained_opens_only_the_shards_of_the_layer(tmp_path, rng):
    w = layer_tensors(rng, E + Z, E, "float32")
    write_checkpoint(tmp_path, longcat_config(), hf_tensors(w, "model.layers.2.mlp.",
                                                            "per_expert"), shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.router.classifier.weight"] = "garbage.safetensors"
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)  # opening it would raise
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=2, device="cpu")
    np.testing.assert_array_equal(layer.w2, w["w2"])
    with pytest.raises(ValueError, match="garbage.safetensors"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=0, device="cpu")


def _good_checkpoint(tmp_path, rng, shards=1):
    w = layer_tensors(rng, E + Z, E, "float32")
    tensors = hf_tensors(w, "model.layers.1.mlp.", "per_expert")
    write_checkpoint(tmp_path, longcat_config(), tensors, shards)
    return tensors


P = "model.layers.1.mlp."
BAD_TENSORS = [  # (edit of the tensors, error kind, message pattern)
    (lambda t: t.pop(P + "experts.3.up_proj.weight"), ValueError, r"experts\.3\.up_proj"),
    (lambda t: t.pop(P + "router.classifier.weight"), ValueError, "router.classifier.weight"),
    (lambda t: t.pop(P + "router.e_score_correction_bias"), ValueError,
     "e_score_correction_bias"),
    (lambda t: [t.pop(k) for k in list(t) if ".experts." in k], ValueError, "no expert tensors"),
    (lambda t: t.update({P + "experts.2.down_proj.weight": np.ones((H, I + 1), np.float32)}),
     ValueError, r"experts\.2\.down_proj.*shape \[24, 12\], got \[24, 13\]"),
    (lambda t: t.update({P + "router.classifier.weight": np.ones((E, H), np.float32)}),
     ValueError, r"router.classifier.weight.*shape"),
    (lambda t: t.update({P + "experts.0.gate_proj.weight": np.ones((I, H), np.int32)}),
     TypeError, r"experts\.0\.gate_proj.*dtype.*I32"),
    (lambda t: t.update({P + "router.e_score_correction_bias": np.ones(E + Z, np.int64)}),
     TypeError, "e_score_correction_bias.*I64"),
]


@pytest.mark.parametrize("edit, kind, match", BAD_TENSORS)
@pytest.mark.parametrize("shards", [1, 2])
def test_from_pretrained_bad_tensors_fail_before_allocation(tmp_path, rng, monkeypatch, edit,
                                                           kind, match, shards):
    tensors = _good_checkpoint(tmp_path / "ok", rng, shards)
    edit(tensors)
    write_checkpoint(tmp_path / "bad", longcat_config(), tensors, shards)

    def no_allocation(*a, **k):
        raise AssertionError("weights were allocated before the checkpoint was validated")
    monkeypatch.setattr(checkpoint, "fill_targets", no_allocation)
    with pytest.raises(kind, match=match) as info:
        zm.ZeroExpertMoE.from_pretrained(tmp_path / "bad", layer=1, device="cpu")
    assert str(tmp_path / "bad") in str(info.value)  # names the file (or the index)


def test_from_pretrained_bad_paths_and_layers(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path / "nowhere", layer=0, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path / "empty", layer=0, device="cpu")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(longcat_config()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path / "empty", layer=0, device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json: a file, expected the checkpoint "
                                                "directory"):  # a file that exists: not "no such"
        zm.ZeroExpertMoE.from_pretrained(tmp_path / "empty" / "config.json", layer=0,
                                         device="cpu")
    _good_checkpoint(tmp_path / "ok", rng, shards=2)
    for L in (-1, 3, 100):
        with pytest.raises(ValueError, match=rf"layer: expected 0 <= layer < 3.*got {L}"):
            zm.ZeroExpertMoE.from_pretrained(tmp_path / "ok", layer=L, device="cpu")
    with pytest.raises(TypeError, match="layer"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path / "ok", layer="1", device="cpu")
    with pytest.raises(TypeError, match="dtype"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path / "ok", layer=1, device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="device"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path / "ok", layer=1, device="tpu")
    with pytest.raises(ValueError, match="expert_strategy"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path / "ok", layer=1, device="cpu",
                                         expert_strategy="nope")
    os.remove(tmp_path / "ok" / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path / "ok", layer=1, device="cpu")


def test_fp8_checkpoint_tensors_become_e4m3_and_block_scales(tmp_path, rng):
    # The FP8 layout (LongCat-Flash-FP8 / DeepSeek-V3): e4m3 weights + fp32 weight_scale_inv
    # per 128x128 block, gate and up blocked separately.
    H8, I8 = 136, 130  # ceil: 2 blocks each way
    cfg = longcat_config(hidden_size=H8, expert_ffn_hidden_size=I8, dtype="bfloat16",
                         quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                              "weight_block_size": [128, 128],
                                              "activation_scheme": "dynamic"})
    f8 = ml_dtypes.float8_e4m3fn
    t, truth = {}, {"gate": [], "up": [], "down": [], "sg": [], "su": [], "sd": []}
    t[P + "router.classifier.weight"] = rng.standard_normal((E + Z, H8)).astype(np.float32)
    t[P + "router.e_score_correction_bias"] = np.zeros(E + Z, np.float32)
    for e in range(E):
        for name, shape, s_shape, key, skey in (("gate_proj", (I8, H8), (2, 2), "gate", "sg"),
                                                ("up_proj", (I8, H8), (2, 2), "up", "su"),
                                                ("down_proj", (H8, I8), (2, 2), "down", "sd")):
            q = rng.standard_normal(shape).astype(f8)
            s = rng.random(s_shape).astype(np.float32)
            t[f"{P}experts.{e}.{name}.weight"], truth[key] = q, truth[key] + [q]
            t[f"{P}experts.{e}.{name}.weight_scale_inv"], truth[skey] = s, truth[skey] + [s]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    checkpoint.write_safetensors(str(tmp_path / "model.safetensors"), t, {})
    mcfg, targets = checkpoint.pretrained_layer(str(tmp_path), 1)
    assert mcfg.quantization == "fp8"
    arrays = checkpoint.fill_targets(targets, np)
    assert arrays["w13"].dtype == f8 and arrays["w13_scale_inv"].shape == (E, 4, 2)
    for e in range(E):
        np.testing.assert_array_equal(arrays["w13"][e].view(np.uint8), np.concatenate(
            [truth["gate"][e], truth["up"][e]]).view(np.uint8))
        np.testing.assert_array_equal(arrays["w2"][e].view(np.uint8),
                                      truth["down"][e].view(np.uint8))
        np.testing.assert_array_equal(arrays["w13_scale_inv"][e],
                                      np.concatenate([truth["sg"][e], truth["su"][e]]))
        np.testing.assert_array_equal(arrays["w2_scale_inv"][e], truth["sd"][e])
    t[P + "experts.1.up_proj.weight"] = np.ones((I8, H8), ml_dtypes.bfloat16)
    checkpoint.write_safetensors(str(tmp_path / "model.safetensors"), t, {})
    with pytest.raises(TypeError, match=r"experts\.1\.up_proj.*F8_E4M3.*BF16"):
        checkpoint.pretrained_layer(str(tmp_path), 1)


# --- save / load / pickle / deepcopy ----------------------------------------------------------
SAVE_CASES = [
    zm.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_zero_experts=Z, top_k=K,
                 use_correction_bias=True, dtype="bfloat16", routed_scaling_factor=3.0),
    zm.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=4, num_zero_experts=4,
                 zero_expert_type=("constant", "identity", "zero", "constant"), top_k=2,
                 scoring_func="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                 dtype="float32"),
]


def _assert_same_layer(a, b, x):
    assert a.config == b.config and a.options() == b.options() and a.device == b.device
    wa, wb = a.numpy_weights(), b.numpy_weights()
    assert wa.keys() == wb.keys()
    for k in wa:
        if wa[k] is None:
            assert wb[k] is None
        else:
            assert wa[k].dtype == wb[k].dtype
            np.testing.assert_array_equal(wa[k], wb[k])
            assert not np.shares_memory(wa[k], wb[k])
    np.testing.assert_array_equal(a(x), b(x))


@pytest.mark.parametrize("cfg", SAVE_CASES)
def test_save_load_pickle_deepcopy(tmp_path, rng, cfg):
    layer = zm.ZeroExpertMoE(cfg, seed=3, device="cpu", max_chunk_tokens=7,
                             expert_strategy="grouped", router_gemm="fp32")
    if layer.e_score_correction_bias is not None:
        layer.e_score_correction_bias = rng.standard_normal(cfg.num_total_experts).astype(
            np.float32) * 0.05
    layer.router_bias = rng.standard_normal(cfg.num_total_experts).astype(np.float32) * 0.1
    x = random_x(rng, 11, H, cfg.dtype)
    path = str(tmp_path / "moe.safetensors")
    layer.save(path)
    loaded = zm.ZeroExpertMoE.load(path, device="cpu")
    _assert_same_layer(layer, loaded, x)
    assert loaded.max_chunk_tokens == 7 and loaded.router_gemm == "fp32"
    _assert_same_layer(layer, pickle.loads(pickle.dumps(layer)), x)
    _assert_same_layer(layer, copy.deepcopy(layer), x)
    # The file is plain safetensors: the package reads it.
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        assert zm.MoEConfig.from_dict(json.loads(meta["config"])) == cfg
        np.testing.assert_array_equal(f.get_tensor("router_weight"), layer.router_weight)
        assert "const_vec" in f.keys() if cfg.has_constant_experts else "const_vec" not in f.keys()


def test_deterministic_layer_survives_pickle(rng):
    cfg = SAVE_CASES[1]
    layer = zm.ZeroExpertMoE(cfg, seed=1, device="cpu", deterministic=True)
    back = pickle.loads(pickle.dumps(layer))
    assert back.deterministic and back.expert_strategy == "fixed"
    x = random_x(rng, 5, H, cfg.dtype)
    np.testing.assert_array_equal(layer(x), back(x))


def test_numpy_weights_round_trip_into_from_weights(rng):
    cfg = SAVE_CASES[1]
    layer = zm.ZeroExpertMoE(cfg, seed=2, device="cpu")
    back = zm.ZeroExpertMoE.from_weights(cfg, **layer.numpy_weights())
    x = random_x(rng, 6, H, cfg.dtype)
    np.testing.assert_array_equal(layer(x), back(x))
    y_ref, _ = layer.reference(x)
    assert zm.reference.relative_error(layer(x), y_ref) <= 1e-5


def test_load_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        zm.ZeroExpertMoE.load(tmp_path / "missing.safetensors", device="cpu")
    with pytest.raises(FileNotFoundError, match="a directory, expected a safetensors file"):
        zm.ZeroExpertMoE.load(tmp_path, device="cpu")
    save_file({"a": np.ones(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a layer saved by ZeroExpertMoE.save"):
        zm.ZeroExpertMoE.load(tmp_path / "other.safetensors", device="cpu")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json}")
    with pytest.raises(ValueError, match="junk.safetensors.*not a safetensors file"):
        zm.ZeroExpertMoE.load(tmp_path / "junk.safetensors", device="cpu")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="short.safetensors"):
        zm.ZeroExpertMoE.load(tmp_path / "short.safetensors", device="cpu")
    for meta in ("not a dict", ["a", "list"]):  # __metadata__ must be a JSON object
        header = json.dumps({"__metadata__": meta}).encode()
        header += b" " * (-len(header) % 8)
        path = tmp_path / "meta.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(ValueError, match="meta.safetensors.*__metadata__"):
            zm.ZeroExpertMoE.load(path, device="cpu")


def test_config_and_index_not_utf8_name_their_file(tmp_path, rng):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="config.json"):
        zm.MoEConfig.from_hf_config(tmp_path)
    _good_checkpoint(tmp_path, rng, shards=2)
    (tmp_path / "model.safetensors.index.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=1, device="cpu")


def test_save_leaves_no_partial_file(tmp_path, monkeypatch):
    layer = zm.ZeroExpertMoE(SAVE_CASES[0], seed=0, device="cpu")
    # no safetensors name: the write fails midway (set past the assignment check on purpose)
    layer.__dict__["w2"] = layer.w2.astype(np.complex64)
    with pytest.raises(TypeError, match="w2"):
        layer.save(tmp_path / "moe.safetensors")
    assert os.listdir(tmp_path) == []


def test_cli_demo_on_a_checkpoint(tmp_path, rng, capsys):
    _good_checkpoint(tmp_path, rng, shards=2)
    from zeromoe_cupy.cli import main
    assert main(["demo", "--device", "cpu", "--checkpoint", str(tmp_path), "--layer", "1",
                 "--tokens", "9"]) == 0
    out = capsys.readouterr().out
    assert "layer 1" in out and "all checks passed" in out
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--device", "cpu", "--checkpoint", str(tmp_path), "--layer", "7"])
    assert exc.value.code == 2 and "layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--checkpoint", str(tmp_path)])


@pytest.mark.skipif(zm._arrays.gpu_available(), reason="tests the machine without a GPU")
def test_gpu_layer_unpickles_on_the_cpu_with_a_warning(rng):
    layer = zm.ZeroExpertMoE(SAVE_CASES[0], seed=4, device="cpu")
    state = layer.__getstate__()
    state["device"] = "cuda"  # what a GPU layer's pickle holds
    back = zm.ZeroExpertMoE.__new__(zm.ZeroExpertMoE)
    with pytest.warns(RuntimeWarning, match="no GPU"):
        back.__setstate__(state)
    assert back.device == "cpu"
    x = random_x(rng, 4, H, "bfloat16")
    np.testing.assert_array_equal(back(x), layer(x))


# --- on the GPU -------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layout, shards", [("per_expert", 2), ("fused", 1)])
def test_from_pretrained_save_load_pickle_on_the_gpu(tmp_path, rng, layout, shards):
    cp = pytest.importorskip("cupy")
    w = layer_tensors(rng, E + Z, E, "bfloat16")
    write_checkpoint(tmp_path / "ck", longcat_config(dtype="bfloat16"),
                     hf_tensors(w, P, layout, n_unused=Z), shards)
    layer = zm.ZeroExpertMoE.from_pretrained(tmp_path / "ck", layer=1, device="cuda")
    assert layer.device == "cuda" and isinstance(layer.w13, cp.ndarray)
    for k in ("router_weight", "w13", "w2", "e_score_correction_bias"):
        np.testing.assert_array_equal(layer.numpy_weights()[k], w[k])
    x = random_x(rng, 19, H, "bfloat16")
    xd = cp.asarray(x)
    assert zm.reference.relative_error(layer(xd).get(), reference_y(layer.config, w, x)) <= 1e-2
    layer.save(tmp_path / "moe.safetensors")
    copies = [zm.ZeroExpertMoE.load(tmp_path / "moe.safetensors", device="cuda"),
              pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)]
    for c in copies:
        assert c.device == "cuda" and c.config == layer.config and c.options() == layer.options()
        assert c.w13.data.ptr != layer.w13.data.ptr
        cp.testing.assert_array_equal(c(xd), layer(xd))
    cpu = zm.ZeroExpertMoE.load(tmp_path / "moe.safetensors", device="cpu")
    np.testing.assert_array_equal(cpu.w13, layer.w13.get())


def test_e4m3_bits_are_written_as_f8_and_read_back(tmp_path, rng):
    q = rng.standard_normal((3, 4, 5)).astype(ml_dtypes.float8_e4m3fn)
    path = str(tmp_path / "f8.safetensors")
    checkpoint.write_safetensors(path, {"w13": q.view(np.uint8), "w2": q}, {},
                                 e4m3_bits=("w13", "w2"))
    tensors, _ = checkpoint.read_header(path)
    assert tensors["w13"].dtype == tensors["w2"].dtype == "F8_E4M3"
    for name in ("w13", "w2"):
        back = checkpoint.read_tensor(tensors[name])
        assert back.dtype == ml_dtypes.float8_e4m3fn
        np.testing.assert_array_equal(back.view(np.uint8), q.view(np.uint8))
        np.testing.assert_array_equal(checkpoint.read_tensor(tensors[name], index=2).view(
            np.uint8), q[2].view(np.uint8))


def test_progress_bar_counts_every_byte(tmp_path, rng, capsys):
    _good_checkpoint(tmp_path, rng, shards=2)
    cfg, targets = checkpoint.pretrained_layer(str(tmp_path), 1)
    arrays = checkpoint.fill_targets(targets, np, progress=True)
    err = capsys.readouterr().err
    total = sum(a.nbytes for a in arrays.values())
    assert "loading layer" in err and "100%" in err
    assert f"{total / 1e3:.1f}k" in err or f"{total / 1e3:.0f}k" in err


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_from_pretrained_rank_reads_only_its_experts(tmp_path, rng, layout):
    R, E8 = 2, 8
    w = layer_tensors(rng, E8 + Z, E8, "float32")
    write_checkpoint(tmp_path, longcat_config(n_routed_experts=E8),
                     hf_tensors(w, P, layout), shards=1)
    groups = zm.parallel.local_groups(R)
    for g in groups:
        part = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=1, device="cpu", group=g)
        lo, hi = g.rank * E8 // R, (g.rank + 1) * E8 // R
        np.testing.assert_array_equal(part.w13, w["w13"][lo:hi])
        np.testing.assert_array_equal(part.w2, w["w2"][lo:hi])
        np.testing.assert_array_equal(part.router_weight, w["router_weight"])
        with pytest.raises(TypeError, match="rank layer"):
            pickle.dumps(part)
        with pytest.raises(TypeError, match="rank layer"):
            part.save(tmp_path / "x.safetensors")
    # The ranks' layers together compute the whole layer.
    xs = [random_x(rng, 6, H, "float32"), random_x(rng, 3, H, "float32")]
    outs = zm.parallel.run_local(
        lambda g: zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=1, device="cpu",
                                                   group=g)(xs[g.rank]), R, 30.0)
    cfg = zm.MoEConfig.from_hf_config(tmp_path)
    for x, y in zip(xs, outs):
        assert zm.reference.relative_error(y, reference_y(cfg, w, x)) <= 1e-5
    with pytest.raises(ValueError, match="3 ranks must divide"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=1, device="cpu",
                                         group=zm.parallel.local_groups(3)[0])


def test_rank_opens_only_the_shards_of_its_experts(tmp_path, rng):
    E8 = 8
    w = layer_tensors(rng, E8 + Z, E8, "float32")
    tensors = hf_tensors(w, P, "per_expert")
    write_checkpoint(tmp_path, longcat_config(n_routed_experts=E8), tensors, shards=1)
    # Move experts 4..7 into a shard that is garbage: rank 0 of 2 must never open it.
    index = {"weight_map": {k: "model.safetensors" for k in tensors}}
    for e in range(4, E8):
        for n in ("gate_proj", "up_proj", "down_proj"):
            index["weight_map"][f"{P}experts.{e}.{n}.weight"] = "garbage.safetensors"
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    g0, g1 = zm.parallel.local_groups(2)
    part = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=1, device="cpu", group=g0)
    np.testing.assert_array_equal(part.w13, w["w13"][:4])
    with pytest.raises(ValueError, match="garbage.safetensors"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=1, device="cpu", group=g1)


def _rewrite(path, out, drop=(), replace=None, meta=None):
    """The saved file ``path`` rewritten to ``out`` with tensors dropped / replaced and
    metadata entries changed."""
    tensors, old_meta = checkpoint.read_header(str(path))
    arrays = {k: checkpoint.read_tensor(v) for k, v in tensors.items() if k not in drop}
    arrays.update(replace or {})
    checkpoint.write_safetensors(str(out), arrays, {**old_meta, **(meta or {})})
    return str(out)


@pytest.mark.parametrize("cfg", SAVE_CASES)
def test_load_names_the_file_and_key_of_a_bad_tensor(tmp_path, rng, cfg):
    layer = zm.ZeroExpertMoE(cfg, seed=1, device="cpu")
    path = tmp_path / "m.safetensors"
    layer.save(path)
    w = layer.numpy_weights()
    names = [k for k, v in w.items() if v is not None]
    for k in names:
        if k != "router_weight":  # a layer may be saved without a router
            with pytest.raises(ValueError, match=f"bad.safetensors.*'{k}'.*missing"):
                zm.ZeroExpertMoE.load(_rewrite(path, tmp_path / "bad.safetensors", drop=[k]),
                                      device="cpu")
        with pytest.raises(ValueError, match=f"bad.safetensors.*'{k}'.*expected shape"):
            zm.ZeroExpertMoE.load(_rewrite(path, tmp_path / "bad.safetensors",
                                           replace={k: w[k][..., :-1].copy()}), device="cpu")
        other = np.float16 if w[k].dtype != np.float16 else np.float32
        with pytest.raises(TypeError, match=f"bad.safetensors.*'{k}'.*expected dtype"):
            zm.ZeroExpertMoE.load(_rewrite(path, tmp_path / "bad.safetensors",
                                           replace={k: w[k].astype(other)}), device="cpu")
    with pytest.raises(ValueError, match="bad.safetensors.*'extra'"):
        zm.ZeroExpertMoE.load(_rewrite(path, tmp_path / "bad.safetensors",
                                       replace={"extra": w["w2"]}), device="cpu")
    for version in ("", "2", "garbage"):
        with pytest.raises(ValueError, match="bad.safetensors.*format_version"):
            zm.ZeroExpertMoE.load(_rewrite(path, tmp_path / "bad.safetensors",
                                           meta={"format_version": version}), device="cpu")
    for options in ("null", "[]", '{"max_chunk_tokens": 8, "bogus": 1}'):
        with pytest.raises(ValueError, match="bad.safetensors: metadata 'options'"):
            zm.ZeroExpertMoE.load(_rewrite(path, tmp_path / "bad.safetensors",
                                           meta={"options": options}), device="cpu")
    # the untouched file still loads
    x = random_x(rng, 5, H, cfg.dtype)
    np.testing.assert_array_equal(zm.ZeroExpertMoE.load(path, device="cpu")(x), layer(x))


def test_save_to_a_missing_directory_or_onto_a_directory_names_the_path(tmp_path):
    layer = zm.ZeroExpertMoE(SAVE_CASES[0], seed=0, device="cpu")
    path = tmp_path / "no" / "such" / "m.safetensors"
    with pytest.raises(FileNotFoundError, match=f"{path}: no such directory") as info:
        layer.save(path)
    assert ".tmp" not in str(info.value)
    with pytest.raises(IsADirectoryError, match=f"{tmp_path}: is a directory") as info:
        layer.save(tmp_path)
    assert ".tmp" not in str(info.value) and os.listdir(tmp_path) == []
