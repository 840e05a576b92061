"""MoEConfig: the shape and routing options of a zero-expert MoE layer (SPEC.md)."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

ZERO_EXPERT_TYPES = ("identity", "zero", "constant")
SCORING_FUNCS = ("softmax", "sigmoid")
DTYPES = ("bfloat16", "float16", "float32")

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
    "moe++-7b": dict(
        hidden_size=1536, intermediate_size=4096, num_experts=16, num_zero_experts=4,
        zero_expert_type=("constant", "constant", "identity", "zero"), top_k=2,
        scoring_func="softmax", use_correction_bias=False, renormalize=True,
        routed_scaling_factor=1.0, dtype="bfloat16",
    ),
}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Shapes and routing options of a ZeroExpertMoE layer.

    Experts 0..E-1 are real SwiGLU MLPs; experts E..E+Z-1 are zero-computation experts
    whose kind is given by ``zero_expert_type`` (one string for all, or one per zero expert).
    ``use_correction_bias`` gives the layer a selection-only bias (zeros unless loaded).
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    num_zero_experts: int = 0
    zero_expert_type: Union[str, Sequence[str]] = "identity"
    top_k: int = 2
    scoring_func: str = "softmax"
    renormalize: bool = False
    routed_scaling_factor: float = 1.0
    num_expert_group: int | None = None
    topk_group: int | None = None
    dtype: str = "bfloat16"
    use_correction_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.num_zero_experts, bool) or not isinstance(self.num_zero_experts, int):
            raise TypeError(f"num_zero_experts: expected an int, got {self.num_zero_experts!r}")
        if self.num_zero_experts < 0:
            raise ValueError(f"num_zero_experts: expected >= 0, got {self.num_zero_experts}")
        n = self.num_experts + self.num_zero_experts
        if self.top_k > n:
            raise ValueError(f"top_k: expected <= num_experts + num_zero_experts = {n}, "
                             f"got {self.top_k}")
        # Normalise the zero-expert types to a tuple of Z strings (frozen: set via object).
        types = self.zero_expert_type
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
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func: expected one of {SCORING_FUNCS}, "
                             f"got {self.scoring_func!r}")
        if self.dtype not in DTYPES:
            raise TypeError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        rsf = self.routed_scaling_factor
        if isinstance(rsf, bool) or not isinstance(rsf, (int, float)) or rsf != rsf:
            raise TypeError(f"routed_scaling_factor: expected a float, got {rsf!r}")
        object.__setattr__(self, "routed_scaling_factor", float(rsf))
        g, tg = self.num_expert_group, self.topk_group
        if (g is None) != (tg is None):
            raise ValueError("num_expert_group and topk_group: expected both or neither, "
                             f"got num_expert_group={g}, topk_group={tg}")
        if g is not None:
            _positive_int("num_expert_group", g)
            _positive_int("topk_group", tg)
            if n % g:
                raise ValueError(f"num_expert_group: expected a divisor of "
                                 f"num_experts + num_zero_experts = {n}, got {g}")
            if tg > g:
                raise ValueError(f"topk_group: expected <= num_expert_group={g}, got {tg}")
            if self.top_k > tg * (n // g):
                raise ValueError(f"top_k: expected <= topk_group * group size = "
                                 f"{tg * (n // g)}, got {self.top_k}")

    # Derived sizes, named as in SPEC.md.
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

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MoEConfig":
        """A named configuration ("tiny", "longcat-flash", "moe++-7b"), fields overridable."""
        if name not in _PRESETS:
            raise ValueError(f"preset: expected one of {sorted(_PRESETS)}, got {name!r}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"preset overrides: unknown field(s) {sorted(unknown)}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        return tuple(_PRESETS)
