"""MoEConfig: the shape and routing options of a zero-expert MoE layer (docs/spec.md)."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Callable, NamedTuple, Sequence, Union

import numpy as np

from ._arrays import check_int

ZERO_EXPERT_TYPES = ("identity", "zero", "constant")
SCORING_FUNCS = ("softmax", "sigmoid")
DTYPES = ("bfloat16", "float16", "float32")
QUANTIZATIONS = (None, "fp8")

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=256, intermediate_size=512, num_experts=8, num_zero_experts=4,
        zero_expert_type="identity", top_k=2, scoring_func="softmax",
        use_correction_bias=True, renormalize=False, routed_scaling_factor=1.0,
        dtype="float32",
    ),
    "longcat-flash": dict(
        hidden_size=6144, intermediate_size=2048, num_experts=512, num_zero_experts=256,
        zero_expert_type="identity", top_k=12, scoring_func="softmax",
        use_correction_bias=True, renormalize=False, routed_scaling_factor=6.0,
        dtype="bfloat16",
    ),
    # The published MoE-Plus-Plus-7B config.json: hidden 1536, intermediate 4096,
    # num_experts [20] (16 FFN + constant, constant, copy, zero), top-2 (fixed in their code),
    # moe_2layer_gate false, moe_use_logits_norm true with moe_gate_norm_std 1.0,
    # moe_feature_no_mul_topk true (no input scaling), moe_use_mixtral_gating false
    # (drop-zero gating); their decoder always threads the gating residual.
    "moe++-7b": dict(
        hidden_size=1536, intermediate_size=4096, num_experts=16, num_zero_experts=4,
        zero_expert_type=("constant", "constant", "identity", "zero"), top_k=2,
        scoring_func="softmax", use_correction_bias=False, renormalize="drop_zero",
        routed_scaling_factor=1.0, dtype="bfloat16", gating_residual=True,
        router_logits_norm_std=1.0,
    ),
}


def _finite_float(name: str, value: Any) -> float:
    """value as a finite Python float: ints, floats and NumPy scalars; bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def _positive_float(name: str, value: Any) -> float:
    value = _finite_float(name, value)
    if value <= 0:
        raise ValueError(f"{name}: expected a finite float > 0, got {value}")
    return value


def _flag(name: str, value: Any, strings: tuple[str, ...] = ()) -> Any:
    """value as a bool (Python or NumPy bool), or one of ``strings``: a string such as "no"
    would otherwise read as true."""
    if isinstance(value, str) and value in strings:
        return value
    if not isinstance(value, (bool, np.bool_)):
        allowed = " or ".join(["a bool"] + [repr(t) for t in strings])
        raise TypeError(f"{name}: expected {allowed}, got {type(value).__name__} {value!r}")
    return bool(value)


# The string values each flag takes besides True / False.
FLAG_STRINGS: dict[str, tuple[str, ...]] = {"renormalize": ("drop_zero",),
                                             "use_correction_bias": (), "gating_residual": ()}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Shapes and routing options of a ZeroExpertMoE layer.

    Experts 0..E-1 are real SwiGLU MLPs; experts E..E+Z-1 are zero-computation experts
    whose kind is given by ``zero_expert_type`` (one string for all, or one per zero expert).
    ``use_correction_bias`` gives the layer a selection-only bias (zeros unless loaded).
    ``quantization``: None, or "fp8" for block-scaled e4m3 expert weights (one fp32 scale per
    ``weight_block_size`` = (128, 128) block; activations quantized per token and 128 features;
    docs/spec.md "FP8 experts"). The router and the zero experts stay unquantized.

    MoE++ options (docs/spec.md "MoE++ options"; the defaults leave them off):
    ``renormalize``: False, True (w / sum(w) over the K slots) or "drop_zero" (slots of
    "zero"-type experts get weight 0 first; all 0 when every slot is one).
    ``expert_input_scale`` s: every expert, real and zero, is applied to s * x rounded to
    x's dtype; the router reads x.
    ``router_hidden_size`` R: a two-layer router L = W2 @ tanh(W1 @ fp32(x)), W1 [R, H],
    W2 [E+Z, R] (None: one layer, L = Wr @ fp32(x)).
    ``gating_residual``: L = router(x) + gate_map @ L_prev, L_prev the previous layer's logits.
    ``router_logits_norm_std`` sigma: the scores use L / (std(L) / sigma) per token (unbiased
    std over the E+Z logits; a token whose std is 0 uses L); None: off.
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    num_zero_experts: int = 0
    zero_expert_type: Union[str, Sequence[str]] = "identity"
    top_k: int = 2
    scoring_func: str = "softmax"
    renormalize: Union[bool, str] = False
    routed_scaling_factor: float = 1.0
    num_expert_group: int | None = None
    topk_group: int | None = None
    dtype: str = "bfloat16"
    use_correction_bias: bool = False
    # FP8 experts (block-scaled e4m3; docs/spec.md "FP8 experts").
    quantization: str | None = None
    weight_block_size: tuple[int, int] = (128, 128)
    expert_input_scale: float = 1.0
    router_hidden_size: int | None = None
    gating_residual: bool = False
    router_logits_norm_std: float | None = None

    def __post_init__(self) -> None:
        # Numbers may come as NumPy scalars (np.int64(2)): stored as Python int / float.
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1))
        object.__setattr__(self, "num_zero_experts",
                           check_int("num_zero_experts", self.num_zero_experts, 0))
        for name, strings in FLAG_STRINGS.items():
            object.__setattr__(self, name, _flag(name, getattr(self, name), strings))
        object.__setattr__(self, "routed_scaling_factor",
                           _finite_float("routed_scaling_factor", self.routed_scaling_factor))
        n = self.num_experts + self.num_zero_experts
        if self.top_k > n:
            raise ValueError(f"top_k: expected <= num_experts + num_zero_experts = {n}, "
                             f"got {self.top_k}")
        # Normalise the zero-expert types to a tuple of Z strings (frozen: set via object).
        types = self.zero_expert_type
        if not isinstance(types, (str, list, tuple)):
            raise TypeError(f"zero_expert_type: expected one of {ZERO_EXPERT_TYPES} or a "
                            f"sequence of num_zero_experts={self.num_zero_experts} of them, got "
                            f"{type(types).__name__} {types!r}")
        if isinstance(types, str):
            types_t = (types,) * self.num_zero_experts
            bad = [] if types in ZERO_EXPERT_TYPES else [types]
        else:
            types_t = tuple(types)
            if len(types_t) != self.num_zero_experts:
                raise ValueError(f"zero_expert_type: expected one string or a sequence of "
                                 f"num_zero_experts={self.num_zero_experts} strings, got "
                                 f"{len(types_t)} of them")
            bad = [t for t in types_t if t not in ZERO_EXPERT_TYPES]
        if bad:
            raise ValueError(f"zero_expert_type: expected each of {ZERO_EXPERT_TYPES}, "
                             f"got {bad[0]!r}")
        object.__setattr__(self, "zero_expert_type",
                           types if isinstance(types, str) else types_t)
        object.__setattr__(self, "_zero_types", types_t)
        if not isinstance(self.scoring_func, str):
            raise TypeError(f"scoring_func: expected one of {SCORING_FUNCS}, got "
                            f"{type(self.scoring_func).__name__} {self.scoring_func!r}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func: expected one of {SCORING_FUNCS}, "
                             f"got {self.scoring_func!r}")
        if not isinstance(self.dtype, str):  # a NumPy dtype or scalar type: its name
            try:
                name = None if self.dtype is None else np.dtype(self.dtype).name
            except TypeError:
                name = None
            if name not in DTYPES:
                raise TypeError(f"dtype: expected one of {DTYPES} (or their NumPy / ml_dtypes "
                                f"dtypes), got {self.dtype!r}")
            object.__setattr__(self, "dtype", name)
        if self.dtype not in DTYPES:
            raise TypeError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "expert_input_scale",
                           _positive_float("expert_input_scale", self.expert_input_scale))
        if self.router_hidden_size is not None:
            object.__setattr__(self, "router_hidden_size",
                               check_int("router_hidden_size", self.router_hidden_size, 1))
        if self.router_logits_norm_std is not None:
            object.__setattr__(self, "router_logits_norm_std", _positive_float(
                "router_logits_norm_std", self.router_logits_norm_std))
        g, tg = self.num_expert_group, self.topk_group
        if (g is None) != (tg is None):
            raise ValueError("num_expert_group and topk_group: expected both or neither, "
                             f"got num_expert_group={g}, topk_group={tg}")
        if g is not None:
            g, tg = check_int("num_expert_group", g, 1), check_int("topk_group", tg, 1)
            object.__setattr__(self, "num_expert_group", g)
            object.__setattr__(self, "topk_group", tg)
            if n % g:
                raise ValueError(f"num_expert_group: expected a divisor of "
                                 f"num_experts + num_zero_experts = {n}, got {g}")
            if tg > g:
                raise ValueError(f"topk_group: expected <= num_expert_group={g}, got {tg}")
            if self.top_k > tg * (n // g):
                raise ValueError(f"top_k: expected <= topk_group * group size = "
                                 f"{tg * (n // g)}, got {self.top_k}")
        if self.quantization is not None and not isinstance(self.quantization, str):
            raise TypeError(f"quantization: expected one of {QUANTIZATIONS}, got "
                            f"{type(self.quantization).__name__} {self.quantization!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: expected one of {QUANTIZATIONS}, "
                             f"got {self.quantization!r}")
        block = self.weight_block_size
        if isinstance(block, (list, tuple)) and len(block) == 2:
            block = tuple(int(b) if isinstance(b, numbers.Integral) and not isinstance(b, bool)
                          else b for b in block)  # NumPy ints as Python ints, as elsewhere
        if block != (128, 128) or not all(type(b) is int for b in block):
            raise ValueError(f"weight_block_size: expected (128, 128) (the only block size "
                             f"supported), got {self.weight_block_size!r}")
        object.__setattr__(self, "weight_block_size", block)

    # Derived sizes, named as in docs/spec.md.
    @property
    def num_total_experts(self) -> int:
        """E + Z: the width of the router."""
        return self.num_experts + self.num_zero_experts

    @property
    def zero_types(self) -> tuple[str, ...]:
        """The type of each zero expert, a tuple of Z strings."""
        return self._zero_types  # type: ignore[attr-defined]

    @property
    def has_constant_experts(self) -> bool:
        return "constant" in self.zero_types

    @property
    def drop_experts(self) -> tuple[bool, ...]:
        """E+Z flags: True for the "zero"-type experts, whose weight renormalize="drop_zero"
        sets to 0."""
        return (False,) * self.num_experts + tuple(t == "zero" for t in self.zero_types)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MoEConfig":
        """A named configuration ("tiny", "longcat-flash", "moe++-7b"), fields overridable."""
        if not isinstance(name, str):
            raise TypeError(f"preset: expected a name (str) among {sorted(_PRESETS)}, got "
                            f"{type(name).__name__}")
        if name not in _PRESETS:
            raise ValueError(f"preset: expected one of {sorted(_PRESETS)}, got {name!r}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"preset overrides: unknown field(s) {sorted(unknown)}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        return tuple(_PRESETS)

    # --- the library's own format --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-safe values (str, int, float, bool, None, lists).

        ``MoEConfig.from_dict(cfg.to_dict()) == cfg``; ``json.dumps`` takes the result.
        """
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoEConfig":
        """The inverse of ``to_dict``. Raises TypeError for a non-dict or unknown keys, and
        whatever the constructor raises for bad values."""
        if not isinstance(d, dict):
            raise TypeError(f"d: expected a dict (from MoEConfig.to_dict), got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TypeError(f"MoEConfig.from_dict: unknown key(s) {unknown}; expected keys "
                            f"among {sorted(names)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    # --- Hugging Face configs ------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, path_or_dict: Union[str, "os.PathLike[str]", dict]) -> "MoEConfig":
        """The MoE layer's config from a Hugging Face model config.

        ``path_or_dict``: a checkpoint directory (its ``config.json`` is read), a path to a
        ``config.json``, or the config as a dict. Supported ``model_type`` values are the keys
        of ``HF_MODEL_TYPES`` ("longcat_flash", "deepseek_v3", "MoE++"); missing keys take the
        defaults of the matching config class (transformers', or MoE++'s own ``MoeConfig``,
        whose flags map as docs/spec.md "MoE++ options" says); a key present as null is an
        error, as those classes keep None (docs/spec.md "Hugging Face configs" lists the keys
        read). ``torch_dtype`` / ``dtype`` gives ``dtype`` (absent or null: "bfloat16");
        ``quantization_config`` (null: absent) with
        ``quant_method "fp8"`` (e4m3, 128x128 blocks, dynamic activations) gives
        ``quantization="fp8"``.

        Raises FileNotFoundError naming the path when there is no config file; ValueError for
        an unknown model type (listing the supported ones) or an unsupported value, naming
        the key; TypeError for a wrong kind of argument or for an int, bool or dtype key whose
        value has the wrong type (e.g. a string where an int belongs). Keys of other kinds
        (names such as scoring_func, lists, quantization_config) raise ValueError for any
        value they do not take, of whatever type.
        """
        return parse_hf_config(path_or_dict).config


class HFModel(NamedTuple):
    """What a Hugging Face config says about the model around the MoE layers."""

    config: MoEConfig                 # the MoE layer's config
    model_type: str
    num_layers: int                   # decoder layers: model.layers.0 .. num_layers - 1
    dense_layers: tuple[int, ...]     # layers whose mlp is a dense MLP, not this MoE layer
    router_bias: bool                 # the config declares a router (classifier) bias


class _Keys:
    """Reads a Hugging Face config dict with the defaults of its transformers class; errors
    name the key.

    An absent key takes the default; a key present as null is an error. None of the classes
    read here (transformers' LongcatFlashConfig and DeepseekV3Config, MoE++'s MoeConfig)
    turns a None into its default for these keys: they keep None, and their model then fails
    or, for a flag, reads it as false. (Elsewhere null is absent where transformers says so:
    ``torch_dtype`` / ``dtype`` and ``quantization_config``.)"""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def get(self, key: str, default: Any) -> Any:
        if key not in self.d:
            return default
        if self.d[key] is None:
            raise ValueError(f"{self.source}: key {key!r}: expected a value, got null (leave "
                             f"the key out for the default, {default!r})")
        return self.d[key]

    def int(self, key: str, default: Any) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):  # a wrong type: TypeError (README)
            raise TypeError(f"{self.source}: key {key!r}: expected an int, got {v!r}")
        return v

    def bool(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):  # a wrong type ("false", 0): TypeError (README)
            raise TypeError(f"{self.source}: key {key!r}: expected a bool, got {v!r}")
        return v

    def error(self, key: str, expected: str) -> ValueError:
        return ValueError(f"{self.source}: key {key!r}: expected {expected}, "
                          f"got {self.d.get(key)!r}")


def _hf_dtype(k: _Keys) -> str:
    # dtype absent or null: transformers reads torch_dtype
    key = "dtype" if k.d.get("dtype") is not None else "torch_dtype"
    v = k.d.get(key)
    if v is None:
        return "bfloat16"
    if type(v).__module__ == "torch":  # a torch.dtype, as a config object's __dict__ holds it
        v = str(v)
    if not isinstance(v, str):  # a wrong type: TypeError (README)
        raise TypeError(f"{k.source}: key {key!r}: expected a dtype name (str), got {v!r}")
    name = v.removeprefix("torch.")
    if name not in DTYPES:
        raise k.error(key, f"one of {DTYPES}")
    return name


def _hf_quantization(k: _Keys) -> dict[str, Any]:
    q = k.d.get("quantization_config")
    if q is None:
        return {}
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        raise ValueError(f"{k.source}: key 'quantization_config': expected quant_method 'fp8' "
                         f"(the only quantization supported), got {q!r}")
    fmt, act = q.get("fmt", "e4m3"), q.get("activation_scheme", "dynamic")
    block = q.get("weight_block_size", [128, 128])
    if fmt != "e4m3" or act != "dynamic" or not isinstance(block, (list, tuple)) \
            or list(block) != [128, 128]:
        raise ValueError(f"{k.source}: key 'quantization_config': expected fmt 'e4m3', "
                         f"activation_scheme 'dynamic', weight_block_size [128, 128], got "
                         f"fmt={fmt!r}, activation_scheme={act!r}, weight_block_size={block!r}")
    return {"quantization": "fp8", "weight_block_size": (128, 128)}


def _parse_longcat_flash(k: _Keys) -> dict[str, Any]:
    # transformers' LongcatFlashConfig: softmax scores, the correction bias chooses, no
    # renormalization; every decoder layer holds one MoE block (model.layers.L.mlp).
    zero_type = k.get("zero_expert_type", "identity")
    if zero_type not in ("identity", "zero"):  # a LongCat checkpoint holds no constant experts
        raise k.error("zero_expert_type", "'identity' or 'zero' (LongCat-Flash checkpoints name "
                      "no constant-expert tensors)")
    router_bias = k.bool("router_bias", False)
    fields = dict(
        hidden_size=k.int("hidden_size", 6144),
        intermediate_size=k.int("expert_ffn_hidden_size", 2048),
        num_experts=k.int("n_routed_experts", 512),
        num_zero_experts=k.int("zero_expert_num", 256),
        zero_expert_type=zero_type, top_k=k.int("moe_topk", 12), scoring_func="softmax",
        renormalize=False, routed_scaling_factor=k.get("routed_scaling_factor", 6.0),
        use_correction_bias=True)
    keys = dict(hidden_size="hidden_size", intermediate_size="expert_ffn_hidden_size",
                num_experts="n_routed_experts", num_zero_experts="zero_expert_num",
                top_k="moe_topk", routed_scaling_factor="routed_scaling_factor")
    return dict(fields=fields, num_layers=k.int("num_layers", 28), dense_layers=(),
                router_bias=router_bias, keys=keys)


def _parse_deepseek_v3(k: _Keys) -> dict[str, Any]:
    # transformers' DeepseekV3Config; DeepSeek's own config.json adds scoring_func (sigmoid),
    # topk_method and moe_layer_freq. No zero experts; shared experts are not this layer.
    if "num_experts_per_tok" in k.d and k.d["num_experts_per_tok"] is None:
        raise k.error("num_experts_per_tok", "an int (None means a dense model, no MoE layer)")
    top_k = k.int("num_experts_per_tok", 8)
    scoring = k.get("scoring_func", "sigmoid")
    if scoring not in SCORING_FUNCS:
        raise k.error("scoring_func", f"one of {SCORING_FUNCS}")
    norm = k.bool("norm_topk_prob", True)
    n_layers = k.int("num_hidden_layers", 61)
    first_dense = k.int("first_k_dense_replace", 3)
    freq = k.int("moe_layer_freq", 1)
    if freq < 1:
        raise k.error("moe_layer_freq", "an int >= 1 (every freq-th layer is an MoE layer)")
    dense = tuple(L for L in range(n_layers) if L < first_dense or L % freq)
    n_group, topk_group = k.int("n_group", 8), k.int("topk_group", 4)
    method = k.get("topk_method", "noaux_tc")
    if method not in ("noaux_tc", "group_limited_greedy"):  # both grouped, as computed here
        raise k.error("topk_method", "'noaux_tc' (grouped top-k with the correction bias, as "
                      "DeepSeek-V3) or 'group_limited_greedy' (grouped, without it)")
    fields = dict(
        hidden_size=k.int("hidden_size", 7168),
        intermediate_size=k.int("moe_intermediate_size", 2048),
        num_experts=k.int("n_routed_experts", 256), num_zero_experts=0,
        top_k=top_k, scoring_func=scoring, renormalize=norm,
        routed_scaling_factor=k.get("routed_scaling_factor", 2.5),
        num_expert_group=n_group, topk_group=topk_group,
        use_correction_bias=method == "noaux_tc")
    keys = dict(hidden_size="hidden_size", intermediate_size="moe_intermediate_size",
                num_experts="n_routed_experts", top_k="num_experts_per_tok",
                routed_scaling_factor="routed_scaling_factor", num_expert_group="n_group",
                topk_group="topk_group")
    return dict(fields=fields, num_layers=n_layers, dense_layers=dense, router_bias=False,
                keys=keys)


# MoE++'s zero experts, after its FFN experts, in id order (its Experts module).
MOEPP_ZERO_TYPES = ("constant", "constant", "identity", "zero")


def _parse_moe_plus_plus(k: _Keys) -> dict[str, Any]:
    # MoE++'s MoeConfig (configuration_moe_plus_plus.py of SkyworkAI/MoE-plus-plus) with its
    # defaults; docs/spec.md "MoE++ options" maps its flags. num_experts is a list [N]: N - 4
    # FFN experts, then constant, constant, copy, zero. Top-2 is fixed in its code, and its
    # decoder threads the gating residual through every layer.
    n = k.get("num_experts", [32])
    if (not isinstance(n, (list, tuple)) or len(n) != 1 or isinstance(n[0], bool)
            or not isinstance(n[0], int) or n[0] < 5):
        raise k.error("num_experts", "a list [N] with N >= 5 (N - 4 FFN experts, then "
                                     "MoE++'s 4 zero-computation experts)")
    n = n[0]
    flags = {}
    for key, default in (("moe_use_mixtral_gating", False), ("moe_2layer_gate", True),
                         ("moe_use_logits_norm", False), ("moe_feature_no_mul_topk", False)):
        flags[key] = k.bool(key, default)
    mixtral = flags["moe_use_mixtral_gating"]
    interval = k.int("moe_expert_interval", 1)
    if interval < 1:
        raise k.error("moe_expert_interval", "an int >= 1")
    n_layers = k.int("num_hidden_layers", 32)
    # with an interval > 1 only layers L with (L + 1) % interval == 0 hold the MoE block
    dense = () if interval == 1 else tuple(L for L in range(n_layers) if (L + 1) % interval)
    fields = dict(
        hidden_size=k.int("hidden_size", 4096),
        intermediate_size=k.int("intermediate_size", 11008),  # each FFN expert's I
        num_experts=n - len(MOEPP_ZERO_TYPES), num_zero_experts=len(MOEPP_ZERO_TYPES),
        zero_expert_type=MOEPP_ZERO_TYPES, top_k=2, scoring_func="softmax",
        renormalize=True if mixtral else "drop_zero", routed_scaling_factor=1.0,
        expert_input_scale=1.0 if mixtral or flags["moe_feature_no_mul_topk"] else 2.0,
        router_hidden_size=8 * n if flags["moe_2layer_gate"] else None,
        gating_residual=True,
        router_logits_norm_std=(k.get("moe_gate_norm_std", 1.0)
                                if flags["moe_use_logits_norm"] else None))
    keys = dict(hidden_size="hidden_size", intermediate_size="intermediate_size",
                router_logits_norm_std="moe_gate_norm_std")
    return dict(fields=fields, num_layers=n_layers, dense_layers=dense, router_bias=False,
                keys=keys)


# model_type -> parser: _Keys -> dict(fields=MoEConfig fields without dtype/quantization,
# num_layers, dense_layers, router_bias, keys={field: the config key it comes from}, for
# error messages). A new model type is one entry here.
HF_MODEL_TYPES: dict[str, Callable[[_Keys], dict[str, Any]]] = {
    "longcat_flash": _parse_longcat_flash,
    "deepseek_v3": _parse_deepseek_v3,
    "MoE++": _parse_moe_plus_plus,
}


def read_hf_config(path_or_dict) -> tuple[dict, str]:
    """(the config dict, where it came from) for a directory, a config.json path or a dict."""
    if isinstance(path_or_dict, dict):
        return path_or_dict, "config"
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise TypeError(f"path_or_dict: expected a directory, a config.json path or a dict, "
                        f"got {type(path_or_dict).__name__}")
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config file (expected a checkpoint directory "
                                f"holding config.json, or a config.json path)")
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d, path


def parse_hf_config(path_or_dict) -> HFModel:
    """``MoEConfig.from_hf_config`` plus what ``from_pretrained`` needs about the model."""
    d, source = read_hf_config(path_or_dict)
    model_type = d.get("model_type")
    if not isinstance(model_type, str) or model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{source}: key 'model_type': expected one of "
                         f"{sorted(HF_MODEL_TYPES)}, got {model_type!r}")
    k = _Keys(d, source)
    parsed = HF_MODEL_TYPES[model_type](k)
    fields = {**parsed["fields"], "dtype": _hf_dtype(k), **_hf_quantization(k)}
    try:
        cfg = MoEConfig(**fields)
    except (TypeError, ValueError) as exc:
        named = [f"{f} <- key {key!r}" for f, key in parsed.get("keys", {}).items()
                 if f in str(exc)]
        raise type(exc)(f"{source}: {exc}" + (f" ({', '.join(named)})" if named else "")) \
            from exc
    return HFModel(cfg, model_type, parsed["num_layers"], parsed["dense_layers"],
                   parsed["router_bias"])
