"""Checkpoint names and tensors -> the layer's arrays (no GPU code of its own).

Shape legend as in layer.py: H hidden, I expert intermediate, E real experts, Z zero experts.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import as_array, cupy_module, is_cupy

# Key names understood by state_dict_weights (after the prefix), the first found is used.
STATE_DICT_KEYS = {
    "router_weight": ("router.classifier.weight", "gate.weight", "router.weight"),
    "router_bias": ("router.classifier.bias", "gate.bias", "router.bias"),
    "e_score_correction_bias": ("router.e_score_correction_bias",
                                "gate.e_score_correction_bias", "e_score_correction_bias"),
    "w13": ("experts.w13_weight",),
    "w2": ("experts.w2_weight",),
    "const_vec": ("const_vec",),
    "const_gate": ("const_gate",),
}
PER_EXPERT_KEYS = {  # experts.{e}.<name>.weight; the first pair of names found is used
    "gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2"),
}


# gate[e], up[e]: (I, H); down[e]: (H, I) for e < E -> w13 (E, 2I, H), w2 (E, H, I)
def stack_expert_weights(config, gate, up, down):
    """Per-expert matrices stacked into the fused w13 (gate rows first) and w2, one copy.

    NumPy, CuPy or DLPack tensors, all on one device. Raises ValueError for a wrong count or
    shape, TypeError for mixed devices.
    """
    E = config.num_experts
    for name, mats in (("gate", gate), ("up", up), ("down", down)):
        if len(mats) != E:
            raise ValueError(f"{name}: expected {E} matrices (one per real expert), "
                             f"got {len(mats)}")
    gate = [as_array(g, f"gate[{e}]") for e, g in enumerate(gate)]
    up = [as_array(u, f"up[{e}]") for e, u in enumerate(up)]
    down = [as_array(d, f"down[{e}]") for e, d in enumerate(down)]
    xp = cupy_module() if is_cupy(gate[0]) else np
    H, I = config.hidden_size, config.intermediate_size
    for name, mats, shape in (("gate", gate, (I, H)), ("up", up, (I, H)),
                              ("down", down, (H, I))):
        for e, a in enumerate(mats):
            if tuple(a.shape) != shape:
                raise ValueError(f"{name}[{e}]: expected shape {shape}, got {tuple(a.shape)}")
            if is_cupy(a) != (xp is not np):
                raise TypeError(f"{name}[{e}]: expected every matrix on one device")
    w13 = xp.stack([xp.concatenate([g, u], axis=0) for g, u in zip(gate, up)])
    w2 = xp.stack(down)
    return w13, w2


def state_dict_weights(config, state_dict, prefix: str = "") -> dict[str, Any]:
    """The keyword arguments of ``ZeroExpertMoE.from_weights`` found in a checkpoint's tensors.

    Keys, after ``prefix`` (e.g. "model.layers.0.mlp."): the router weight as
    ``router.classifier.weight`` (LongCat-Flash) or ``gate.weight``; its optional bias
    ``router.classifier.bias``; the selection bias ``router.e_score_correction_bias`` or
    ``gate.e_score_correction_bias``; experts either fused (``experts.w13_weight``
    [E, 2I, H], ``experts.w2_weight`` [E, H, I], as vLLM stores them) or per expert
    (``experts.{e}.gate_proj.weight`` / ``up_proj`` / ``down_proj``, or Mixtral's
    ``w1`` / ``w3`` / ``w2``); constant experts' ``const_vec`` and ``const_gate``.
    Raises ValueError naming the keys looked for when the router or an expert is missing.
    """
    def find(names):
        for name in names:
            if prefix + name in state_dict:
                return state_dict[prefix + name]
        return None

    found = {k: find(names) for k, names in STATE_DICT_KEYS.items()}
    if found["router_weight"] is None:
        raise ValueError(f"state_dict: no router weight under {prefix!r} (looked for "
                         f"{[prefix + k for k in STATE_DICT_KEYS['router_weight']]})")
    out = {k: found[k] for k in ("router_weight", "e_score_correction_bias", "router_bias",
                                 "const_vec", "const_gate")}
    if found["w13"] is not None and found["w2"] is not None:
        return {**out, "w13": found["w13"], "w2": found["w2"]}
    mats = {}
    for role, names in PER_EXPERT_KEYS.items():
        for name in names:
            keys = [f"{prefix}experts.{e}.{name}.weight" for e in range(config.num_experts)]
            if all(k in state_dict for k in keys):
                mats[role] = [state_dict[k] for k in keys]
                break
        else:
            raise ValueError(f"state_dict: no {role} matrices for all "
                             f"{config.num_experts} experts under {prefix!r} (looked for "
                             f"experts.{{e}}.{names[0]}.weight and experts.{{e}}."
                             f"{names[1]}.weight, or fused experts.w13_weight/w2_weight)")
    w13, w2 = stack_expert_weights(config, mats["gate"], mats["up"], mats["down"])
    return {**out, "w13": w13, "w2": w2}
