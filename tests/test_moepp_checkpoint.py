"""MoE++ checkpoints on the CPU: the config keys of MoE++'s MoeConfig, its tensor names
(model.layers.L.mlp.moe.*), safetensors shards and torch pickle (.bin) shards, bad input.
The test's own arrays are the truth: the loaded layer must hold them, compute what
from_weights over them computes, and agree with the float64 reference over them."""
import json
import os
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import zeromoe_cupy as zm
from zeromoe_cupy import checkpoint
from zeromoe_cupy._arrays import np_dtype
from zeromoe_cupy.reference import relative_error

from conftest import TOL
from helpers import random_x

H, I, E = 16, 8, 6
N = E + 4          # MoE++: E FFN experts, then constant, constant, copy, zero
T = 32
TYPES = ("constant", "constant", "identity", "zero")

# MoE++ flags -> the options docs/spec.md "MoE++ options" says they mean
MODES = {
    "default": (dict(moe_use_mixtral_gating=False, moe_2layer_gate=False,
                     moe_use_logits_norm=False, moe_feature_no_mul_topk=False),
                dict(renormalize="drop_zero", expert_input_scale=2.0, router_hidden_size=None,
                     router_logits_norm_std=None)),
    "published_7b": (dict(moe_use_mixtral_gating=False, moe_2layer_gate=False,
                          moe_use_logits_norm=True, moe_gate_norm_std=1.0,
                          moe_feature_no_mul_topk=True),
                     dict(renormalize="drop_zero", expert_input_scale=1.0,
                          router_hidden_size=None, router_logits_norm_std=1.0)),
    "mixtral_two_layer": (dict(moe_use_mixtral_gating=True, moe_2layer_gate=True,
                               moe_use_logits_norm=True, moe_gate_norm_std=0.5,
                               moe_feature_no_mul_topk=False),
                          dict(renormalize=True, expert_input_scale=1.0,
                               router_hidden_size=8 * N, router_logits_norm_std=0.5)),
}


def moepp_config(flags, **over):
    d = dict(model_type="MoE++", hidden_size=H, intermediate_size=I, num_experts=[N],
             num_hidden_layers=3, moe_expert_interval=1, torch_dtype="float32",
             vocab_size=10, num_attention_heads=2, **flags)
    d.update(over)
    return d


def truth(rng, two_layer, dtype="float32"):
    """One MoE++ layer's arrays (fp32 router parts, dtype experts): the test's own truth."""
    dt = np_dtype(dtype)

    def normal(shape, scale, d=np.float32):
        return (rng.standard_normal(shape) * scale).astype(np.float32).astype(d)
    R = 8 * N
    w = {"router_weight": normal((N, R), R ** -0.5) if two_layer else normal((N, H), H ** -0.5),
         "router_hidden_weight": normal((R, H), H ** -0.5) if two_layer else None,
         "gate_map": normal((N, N), N ** -0.5),
         "w13": normal((E, 2 * I, H), H ** -0.5, dt), "w2": normal((E, H, I), I ** -0.5, dt),
         "const_vec": normal((2, H), 1.0, dt), "const_gate": normal((2, 2, H), H ** -0.5, dt)}
    return w


def their_names(w, layer):
    """The arrays under MoE++'s names (its MOE module at model.layers.L.mlp), plus tensors of
    the rest of the decoder layer that the loader must leave alone."""
    p = f"model.layers.{layer}.mlp.moe."
    t = {f"model.layers.{layer}.self_attn.q_proj.weight": np.ones((H, H), np.float32),
         p + "gate.gate_map.weight": w["gate_map"]}
    if w["router_hidden_weight"] is None:
        t[p + "gate.wg.weight"] = w["router_weight"]
    else:
        t[p + "gate.wg.0.weight"] = w["router_hidden_weight"]
        t[p + "gate.wg.2.weight"] = w["router_weight"]
    for e in range(E):
        t[f"{p}experts.experts.{e}.up_proj.weight"] = w["w13"][e]
        t[f"{p}experts.experts.{e}.down_proj.weight"] = w["w2"][e]
    for j in range(2):
        t[f"{p}experts.experts.{E + j}.constant"] = w["const_vec"][j]
        t[f"{p}experts.experts.{E + j}.wg.weight"] = w["const_gate"][j]
    return t


def write(path, config, tensors, shards=1, fmt="safetensors"):
    """config.json plus the tensors in `shards` files (an index when shards > 1); fmt
    "safetensors" or "bin" (torch.save of a dict of tensors, as transformers writes)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if not tensors:
        return
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")

    def save(part, fname):
        if fmt == "safetensors":
            save_file({k: np.ascontiguousarray(v) for k, v in part.items()},
                      os.path.join(path, fname))
        else:
            import torch
            torch.save({k: torch.from_numpy(np.ascontiguousarray(v).astype(np.float32)).to(
                torch.bfloat16 if v.dtype == np_dtype("bfloat16") else torch.float32)
                for k, v in part.items()}, os.path.join(path, fname))
    if shards == 1:
        save(tensors, f"{stem}.{ext}")
        return
    names, weight_map = sorted(tensors), {}
    for s in range(shards):
        fname = f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
        part = {n: tensors[n] for n in names[s::shards]}
        save(part, fname)
        weight_map.update(dict.fromkeys(part, fname))
    with open(os.path.join(path, f"{stem}.{ext}.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def from_truth(cfg, w, **kw):
    """from_weights over the truth: the copy and zero experts get zero const rows."""
    z = {k: np.concatenate([w[k], np.zeros((2,) + w[k].shape[1:], w[k].dtype)])
         for k in ("const_vec", "const_gate")}
    return zm.ZeroExpertMoE.from_weights(
        cfg, w["router_weight"], w["w13"], w["w2"], **z,
        router_hidden_weight=w["router_hidden_weight"], gate_map=w["gate_map"], **kw)


def reference(w, opts, x, prev):
    """float64 reference over the truth with the options the flags mean (MODES)."""
    pad = {k: np.concatenate([w[k], np.zeros((2,) + w[k].shape[1:], w[k].dtype)])
           for k in ("const_vec", "const_gate")}
    return zm.reference.forward(
        x, w["router_weight"], w["w13"], w["w2"], top_k=2, num_experts=E,
        zero_expert_type=TYPES, renormalize=opts["renormalize"],
        expert_input_scale=opts["expert_input_scale"],
        router_hidden_weight=w["router_hidden_weight"], gate_map=w["gate_map"],
        prev_router_logits=prev, router_logits_norm_std=opts["router_logits_norm_std"], **pad)


# --- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", sorted(MODES))
def test_from_hf_config_maps_their_flags(mode):
    flags, opts = MODES[mode]
    c = zm.MoEConfig.from_hf_config(moepp_config(flags))
    assert (c.hidden_size, c.intermediate_size, c.num_experts, c.num_zero_experts, c.top_k,
            c.zero_types, c.scoring_func, c.routed_scaling_factor, c.use_correction_bias,
            c.gating_residual, c.dtype) == \
        (H, I, E, 4, 2, TYPES, "softmax", 1.0, False, True, "float32")
    assert {k: getattr(c, k) for k in opts} == opts


def test_from_hf_config_published_and_default_moepp():
    published = dict(model_type="MoE++", hidden_size=1536, intermediate_size=4096,
                     num_experts=[20], moe_2layer_gate=False, moe_use_logits_norm=True,
                     moe_gate_norm_std=1.0, moe_feature_no_mul_topk=True,
                     moe_use_mixtral_gating=False, torch_dtype="bfloat16",
                     num_hidden_layers=24)
    assert zm.MoEConfig.from_hf_config(published) == zm.MoEConfig.preset("moe++-7b")
    # Missing keys take MoeConfig's defaults: 4096 / 11008, num_experts [32], two-layer router
    d = zm.MoEConfig.from_hf_config({"model_type": "MoE++"})
    assert (d.hidden_size, d.intermediate_size, d.num_experts, d.router_hidden_size,
            d.renormalize, d.expert_input_scale, d.router_logits_norm_std) == \
        (4096, 11008, 28, 256, "drop_zero", 2.0, None)


@pytest.mark.parametrize("over, kind, match", [
    (dict(num_experts=20), ValueError, "num_experts.*list"),
    (dict(num_experts=[4]), ValueError, "num_experts"),
    (dict(num_experts=[8, 8]), ValueError, "num_experts"),
    (dict(moe_2layer_gate="yes"), TypeError, "moe_2layer_gate.*bool"),  # a str for a bool
    (dict(moe_expert_interval=0), ValueError, "moe_expert_interval"),
    (dict(moe_use_logits_norm=True, moe_gate_norm_std=-1.0), ValueError, "moe_gate_norm_std"),
    (dict(hidden_size="16"), TypeError, "hidden_size"),  # a string where an int belongs
])
def test_from_hf_config_bad_moepp_values(over, kind, match):
    with pytest.raises(kind, match=match):
        zm.MoEConfig.from_hf_config(moepp_config(MODES["default"][0], **over))


# --- safetensors checkpoints ------------------------------------------------------------------
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("shards", [1, 3])
def test_from_pretrained_moepp(tmp_path, rng, mode, shards):
    flags, opts = MODES[mode]
    ws = [truth(rng, flags["moe_2layer_gate"]) for _ in range(2)]
    write(tmp_path, moepp_config(flags),
          {**their_names(ws[0], 0), **their_names(ws[1], 1)}, shards)
    cfg = zm.MoEConfig.from_hf_config(tmp_path)
    prev = None
    for L, w in enumerate(ws):  # layer 1 gets layer 0's logits: the gating residual
        layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=L, device="cpu")
        assert layer.config == cfg
        for k in ("router_weight", "router_hidden_weight", "gate_map", "w13", "w2"):
            np.testing.assert_array_equal(getattr(layer, k), w[k])
        np.testing.assert_array_equal(layer.const_vec[:2], w["const_vec"])
        np.testing.assert_array_equal(layer.const_gate[:2], w["const_gate"])
        assert not layer.const_vec[2:].any() and not layer.const_gate[2:].any()
        x = random_x(rng, T, H, "float32")
        y, logits = layer(x, prev_router_logits=prev, return_router_logits=True)
        y_w, logits_w = from_truth(cfg, w)(x, prev_router_logits=prev,
                                          return_router_logits=True)
        np.testing.assert_array_equal(y, y_w)
        np.testing.assert_array_equal(logits, logits_w)
        ref, ref_r = reference(w, opts, x, prev)
        assert relative_error(y, ref) <= TOL["float32"]
        assert relative_error(logits, ref_r.router_logits) <= 1e-6
        layer.save(tmp_path / f"layer{L}.safetensors")  # the library's own file keeps it all
        back = zm.ZeroExpertMoE.load(tmp_path / f"layer{L}.safetensors", device="cpu")
        np.testing.assert_array_equal(back(x, prev_router_logits=prev), y)
        prev = logits


def test_from_pretrained_moepp_bf16_and_dtype_override(tmp_path, rng):
    flags, opts = MODES["published_7b"]
    w = truth(rng, False, "bfloat16")
    write(tmp_path, moepp_config(flags, torch_dtype="bfloat16"), their_names(w, 2), shards=2)
    layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=2, device="cpu")
    assert layer.w13.dtype == np_dtype("bfloat16") and layer.router_weight.dtype == np.float32
    x = random_x(rng, T, H, "bfloat16")
    assert relative_error(layer(x), reference(w, opts, x, None)[0]) <= TOL["bfloat16"]
    f32 = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=2, device="cpu", dtype="float32")
    np.testing.assert_array_equal(f32.w2, w["w2"].astype(np.float32))
    x = random_x(rng, T, H, "float32")
    assert relative_error(f32(x), reference(w, opts, x, None)[0]) <= TOL["float32"]


def test_moepp_dense_layers_are_refused(tmp_path, rng):
    flags, opts = MODES["default"]
    w = truth(rng, False)
    # interval 2: layers L with (L + 1) % 2 == 0 (1, 3) are MoE, 0 and 2 dense MLPs
    write(tmp_path, moepp_config(flags, moe_expert_interval=2, num_hidden_layers=4),
          {**their_names(w, 1), **their_names(w, 3)})
    for L in (0, 2):
        with pytest.raises(ValueError, match=rf"model\.layers\.{L} .*dense"):
            zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=L, device="cpu")
    layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=3, device="cpu")
    x = random_x(rng, T, H, "float32")
    assert relative_error(layer(x), reference(w, opts, x, None)[0]) <= TOL["float32"]


P = "model.layers.1.mlp.moe."
BAD = [  # (flags mode, edit of the tensors, error kind, message pattern)
    ("default", lambda t: t.pop(P + "gate.gate_map.weight"), ValueError, "gate_map"),
    ("default", lambda t: t.pop(P + "gate.wg.weight"), ValueError,
     r"gate\.wg\.weight.*moe_2layer_gate false"),
    ("mixtral_two_layer", lambda t: t.pop(P + "gate.wg.0.weight"), ValueError,
     r"gate\.wg\.0\.weight"),
    ("default", lambda t: t.pop(P + "experts.experts.4.down_proj.weight"), ValueError,
     r"experts\.experts\.4\.down_proj"),
    ("default", lambda t: t.pop(P + f"experts.experts.{E + 1}.constant"), ValueError,
     rf"experts\.experts\.{E + 1}\.constant"),
    ("default", lambda t: t.update({P + "experts.experts.2.up_proj.weight":
                                    np.ones((I, H), np.float32)}), ValueError,
     r"experts\.experts\.2\.up_proj.*shape \[16, 16\], got \[8, 16\]"),
    ("default", lambda t: t.update({P + "gate.gate_map.weight": np.ones((N, N - 1),
                                                                        np.float32)}),
     ValueError, r"gate_map.*shape"),
    ("default", lambda t: t.update({P + f"experts.experts.{E}.wg.weight":
                                    np.ones((2, H), np.int32)}), TypeError,
     rf"experts\.experts\.{E}\.wg\.weight.*dtype.*I32"),
]


@pytest.mark.parametrize("mode, edit, kind, match", BAD)
@pytest.mark.parametrize("shards", [1, 2])
def test_moepp_bad_tensors_fail_before_allocation(tmp_path, rng, monkeypatch, mode, edit,
                                                 kind, match, shards):
    flags = MODES[mode][0]
    tensors = their_names(truth(rng, flags["moe_2layer_gate"]), 1)
    edit(tensors)
    write(tmp_path, moepp_config(flags), tensors, shards)

    def no_allocation(*a, **k):
        raise AssertionError("weights were allocated before the checkpoint was validated")
    monkeypatch.setattr(checkpoint, "fill_targets", no_allocation)
    with pytest.raises(kind, match=match) as info:
        zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=1, device="cpu")
    assert str(tmp_path) in str(info.value)  # names the file (or the index)


def test_moepp_rank_layers_compute_the_layer(tmp_path, rng):
    flags, opts = MODES["mixtral_two_layer"]
    w = truth(rng, True)
    write(tmp_path, moepp_config(flags), their_names(w, 0))
    xs = [random_x(rng, 7, H, "float32"), random_x(rng, 5, H, "float32")]
    prevs = [rng.standard_normal((x.shape[0], N)).astype(np.float32) for x in xs]
    outs = zm.parallel.run_local(
        lambda g: zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=0, device="cpu", group=g)(
            xs[g.rank], prev_router_logits=prevs[g.rank]), 2, 30.0)
    for x, prev, y in zip(xs, prevs, outs):
        assert relative_error(y, reference(w, opts, x, prev)[0]) <= TOL["float32"]


# --- torch pickle (.bin) shards ---------------------------------------------------------------
@pytest.mark.parametrize("shards", [1, 2])
def test_bin_shards_without_torch_say_how_to_convert(tmp_path, rng, monkeypatch, shards):
    flags = MODES["default"][0]
    names = sorted(their_names(truth(rng, False), 0))
    write(tmp_path, moepp_config(flags), {}, shards=1)  # config.json only
    if shards == 1:
        (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not read")
        shard = tmp_path / "pytorch_model.bin"
    else:
        files = [f"pytorch_model-0000{s}-of-00002.bin" for s in (1, 2)]
        for f in files:
            (tmp_path / f).write_bytes(b"PK\x03\x04 not read")
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"weight_map": {n: files[i % 2] for i, n in enumerate(names)}}))
        shard = tmp_path / files[0]
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    for kind in (ImportError, ValueError):
        with pytest.raises(kind) as info:
            zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=0, device="cpu")
        msg = str(info.value)
        assert str(shard) in msg or str(tmp_path / "pytorch_model-00002-of-00002.bin") in msg
        assert "pip install torch" in msg and "safetensors.torch.save_file" in msg
        assert "save_pretrained" in msg and "safe_serialization=True" in msg


@pytest.mark.parametrize("shards", [1, 2])
def test_bin_shards_load_with_torch(tmp_path, rng, shards):
    pytest.importorskip("torch")
    flags, opts = MODES["default"]
    w = truth(rng, False, "bfloat16")
    write(tmp_path, moepp_config(flags, torch_dtype="bfloat16"), their_names(w, 1), shards,
          fmt="bin")
    layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=1, device="cpu")
    for k in ("router_weight", "gate_map", "w13", "w2"):
        np.testing.assert_array_equal(getattr(layer, k), w[k])
    np.testing.assert_array_equal(layer.const_vec[:2], w["const_vec"])
    x = random_x(rng, T, H, "bfloat16")
    prev = rng.standard_normal((T, N)).astype(np.float32)
    y = layer(x, prev_router_logits=prev)
    assert relative_error(y, reference(w, opts, x, prev)[0]) <= TOL["bfloat16"]


def test_bin_legacy_format_and_only_the_layers_shards_are_opened(tmp_path, rng):
    torch = pytest.importorskip("torch")
    flags, opts = MODES["published_7b"]
    w = truth(rng, False)
    t = their_names(w, 0)
    write(tmp_path, moepp_config(flags), {}, shards=1)
    # torch's old (pre-zip) format cannot be memory-mapped: read whole
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()},
               tmp_path / "pytorch_model-00001-of-00002.bin",
               _use_new_zipfile_serialization=False)
    (tmp_path / "pytorch_model-00002-of-00002.bin").write_bytes(b"\xff" * 64)  # garbage
    weight_map = dict.fromkeys(t, "pytorch_model-00001-of-00002.bin")
    weight_map[f"model.layers.2.mlp.moe.gate.wg.weight"] = "pytorch_model-00002-of-00002.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": weight_map}))
    layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=0, device="cpu")
    x = random_x(rng, T, H, "float32")
    assert relative_error(layer(x), reference(w, opts, x, None)[0]) <= TOL["float32"]
    with pytest.raises(ValueError, match="pytorch_model-00002-of-00002.bin.*torch state dict"):
        zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=2, device="cpu")


def test_the_conversion_snippet_converts(tmp_path, rng):
    pytest.importorskip("torch")
    pytest.importorskip("safetensors.torch")
    flags, opts = MODES["default"]
    w = truth(rng, False)
    write(tmp_path, moepp_config(flags), their_names(w, 0), shards=2, fmt="bin")
    code = checkpoint.BIN_TO_SAFETENSORS.replace("CHECKPOINT_DIR", str(tmp_path))
    exec(compile(code, "<conversion>", "exec"), {})
    for f in os.listdir(tmp_path):  # the safetensors shards alone must load
        if f.startswith("pytorch_model"):
            os.remove(tmp_path / f)
    layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=0, device="cpu")
    x = random_x(rng, T, H, "float32")
    assert relative_error(layer(x), reference(w, opts, x, None)[0]) <= TOL["float32"]
