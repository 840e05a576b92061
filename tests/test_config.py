import dataclasses

import numpy as np

import pytest

import zeromoe_cupy as zm


def test_presets_have_the_documented_shapes():
    c = zm.MoEConfig.preset("longcat-flash")
    assert (c.hidden_size, c.intermediate_size, c.num_experts, c.num_zero_experts, c.top_k) == \
        (6144, 2048, 512, 256, 12)
    assert c.routed_scaling_factor == 6.0 and c.use_correction_bias and not c.renormalize
    assert c.zero_types == ("identity",) * 256
    t = zm.MoEConfig.preset("tiny")
    assert (t.hidden_size, t.intermediate_size, t.num_experts, t.num_zero_experts, t.top_k) == \
        (256, 512, 8, 4, 2)
    m = zm.MoEConfig.preset("moe++-7b")
    assert m.zero_types == ("constant", "constant", "identity", "zero")
    assert m.renormalize and m.num_experts == 16 and m.top_k == 2


def test_preset_overrides_and_unknowns():
    c = zm.MoEConfig.preset("tiny", dtype="bfloat16", top_k=3)
    assert c.dtype == "bfloat16" and c.top_k == 3
    with pytest.raises(ValueError, match="preset"):
        zm.MoEConfig.preset("nope")
    for bad in (["tiny"], None, 3):
        with pytest.raises(TypeError, match="preset: expected a name"):
            zm.MoEConfig.preset(bad)
    with pytest.raises(TypeError, match="unknown field"):
        zm.MoEConfig.preset("tiny", hiden_size=3)


BASE = dict(hidden_size=8, intermediate_size=4, num_experts=4, num_zero_experts=2, top_k=2)

BAD = [
    (dict(hidden_size=0), ValueError, "hidden_size"),
    (dict(intermediate_size=-1), ValueError, "intermediate_size"),
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(num_zero_experts=-1), ValueError, "num_zero_experts"),
    (dict(top_k=7), ValueError, "top_k"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(hidden_size=2.5), TypeError, "hidden_size"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(zero_expert_type="copy"), ValueError, "zero_expert_type"),
    (dict(zero_expert_type=("identity",)), ValueError, "zero_expert_type"),
    (dict(zero_expert_type=("identity", "one")), ValueError, "zero_expert_type"),
    (dict(scoring_func="relu"), ValueError, "scoring_func"),
    (dict(dtype="float64"), TypeError, "dtype"),
    (dict(dtype="bf16"), TypeError, "dtype"),
    (dict(dtype=np.float64), TypeError, "dtype"),
    (dict(dtype=None), TypeError, "dtype"),
    (dict(num_expert_group=4, topk_group=1), ValueError, "num_expert_group"),
    (dict(num_expert_group=2), ValueError, "topk_group"),
    (dict(num_expert_group=2, topk_group=3), ValueError, "topk_group"),
    (dict(num_expert_group=3, topk_group=1, top_k=3), ValueError, "top_k"),
    (dict(routed_scaling_factor="2"), TypeError, "routed_scaling_factor"),
    # flags are bools: a string such as "no" would read as true
    (dict(renormalize="no"), TypeError, "renormalize"),
    (dict(use_correction_bias="no"), TypeError, "use_correction_bias"),
    (dict(renormalize=1), TypeError, "renormalize"),
    (dict(use_correction_bias=None), TypeError, "use_correction_bias"),
    # numbers are finite
    (dict(routed_scaling_factor=float("inf")), ValueError, "routed_scaling_factor"),
    (dict(routed_scaling_factor=float("-inf")), ValueError, "routed_scaling_factor"),
    (dict(routed_scaling_factor=float("nan")), ValueError, "routed_scaling_factor"),
    (dict(routed_scaling_factor=np.float32("nan")), ValueError, "routed_scaling_factor"),
    (dict(routed_scaling_factor=True), TypeError, "routed_scaling_factor"),
    # kinds that are not the field's
    (dict(zero_expert_type=None), TypeError, "zero_expert_type"),
    (dict(zero_expert_type=3), TypeError, "zero_expert_type"),
    (dict(scoring_func=None), TypeError, "scoring_func"),
    (dict(scoring_func="softplus"), ValueError, "scoring_func"),
    (dict(dtype=None), TypeError, "dtype"),
    (dict(top_k=np.float64(2.0)), TypeError, "top_k"),
    (dict(num_experts=np.bool_(True)), TypeError, "num_experts"),
    (dict(num_zero_experts=np.int64(-1)), ValueError, "num_zero_experts"),
    (dict(quantization="int4"), ValueError, "quantization"),
    (dict(quantization=8), TypeError, "quantization"),
    (dict(quantization=True), TypeError, "quantization"),
]


@pytest.mark.parametrize("override,exc,name", BAD)
def test_invalid_configs_raise_naming_the_field(override, exc, name):
    with pytest.raises(exc, match=name):
        zm.MoEConfig(**{**BASE, **override})


GOOD = [
    dict(),
    dict(num_zero_experts=0),
    dict(zero_expert_type=("constant", "zero")),
    dict(num_expert_group=3, topk_group=2, top_k=4),
    dict(top_k=6),
    dict(scoring_func="sigmoid", renormalize=True, routed_scaling_factor=2.5),
    dict(dtype="float16"),
]


@pytest.mark.parametrize("override", GOOD)
def test_valid_configs_are_accepted(override):
    c = zm.MoEConfig(**{**BASE, **override})
    assert len(c.zero_types) == c.num_zero_experts
    assert c.num_total_experts == c.num_experts + c.num_zero_experts


@pytest.mark.parametrize("given,name", [(np.float32, "float32"), (np.dtype("float16"), "float16"),
                                        ("bfloat16", "bfloat16")])
def test_numpy_dtypes_are_stored_by_name(given, name):
    import ml_dtypes
    c = zm.MoEConfig(**BASE, dtype=given)
    assert c.dtype == name and type(c.dtype) is str
    assert zm.MoEConfig(**BASE, dtype=ml_dtypes.bfloat16).dtype == "bfloat16"
    assert c == zm.MoEConfig(**BASE, dtype=name)


NUMERIC_FIELDS = ("hidden_size", "intermediate_size", "num_experts", "num_zero_experts",
                  "top_k", "num_expert_group", "topk_group", "routed_scaling_factor")


@pytest.mark.parametrize("scalar", [np.int64, np.int32, np.uint16])
def test_numpy_scalars_are_numbers_and_stored_as_python_numbers(scalar):
    given = dict(hidden_size=8, intermediate_size=4, num_experts=4, num_zero_experts=2,
                 top_k=2, num_expert_group=2, topk_group=1, routed_scaling_factor=3)
    c = zm.MoEConfig(**{k: scalar(v) for k, v in given.items()},
                     renormalize=np.bool_(True), use_correction_bias=np.bool_(False))
    plain = zm.MoEConfig(**given, renormalize=True)
    assert c == plain
    for name in NUMERIC_FIELDS:
        want = float if name == "routed_scaling_factor" else int
        assert type(getattr(c, name)) is want, name
    assert c.renormalize is True and c.use_correction_bias is False
    c = zm.MoEConfig(**BASE, routed_scaling_factor=np.float32(2.5))
    assert type(c.routed_scaling_factor) is float and c.routed_scaling_factor == 2.5


def test_config_is_frozen():
    c = zm.MoEConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.top_k = 3


def test_quantization_fields():
    c = zm.MoEConfig.preset("longcat-flash", quantization="fp8")
    assert c.quantization == "fp8" and c.weight_block_size == (128, 128)
    assert zm.MoEConfig(**BASE).quantization is None
    assert zm.MoEConfig(**BASE, weight_block_size=[128, 128]).weight_block_size == (128, 128)
    c = zm.MoEConfig(**BASE, weight_block_size=(np.int64(128), np.int32(128)))
    assert c.weight_block_size == (128, 128) and all(type(b) is int for b in c.weight_block_size)
    for bad in ((128.0, 128.0), (True, 128)):
        with pytest.raises(ValueError, match="weight_block_size"):
            zm.MoEConfig(**BASE, weight_block_size=bad)
    with pytest.raises(ValueError, match="quantization"):
        zm.MoEConfig(**BASE, quantization="int4")
    with pytest.raises(ValueError, match="weight_block_size"):
        zm.MoEConfig(**BASE, quantization="fp8", weight_block_size=(64, 64))
    with pytest.raises((TypeError, ValueError), match="weight_block_size"):
        zm.MoEConfig(**BASE, weight_block_size=None)
