"""Our layer against MoE++'s own layer, the authors' code (tests/vendor/moe_plus_plus_layer.py,
Apache-2.0), built from the same weights: their gating modes, the two-layer router, logits
normalization, input scaling and the gating residual threaded from one layer to the next.
Skipped when torch is not installed.
"""
import importlib.util
import json
import os

import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy._arrays import np_dtype
from zeromoe_cupy.reference import relative_error

from conftest import TOL
from helpers import separated_rows

torch = pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))
H, I, E = 64, 32, 8
N = E + 4  # their layer always has 2 constant, 1 copy and 1 zero expert after the FFN experts
T = 128

# their flags (MoE++ config keys) per mode
MODES = {
    "default": dict(moe_use_mixtral_gating=False, moe_2layer_gate=False,
                    moe_use_logits_norm=False, moe_feature_no_mul_topk=False),
    "published_7b": dict(moe_use_mixtral_gating=False, moe_2layer_gate=False,
                         moe_use_logits_norm=True, moe_gate_norm_std=1.0,
                         moe_feature_no_mul_topk=True),
    "mixtral": dict(moe_use_mixtral_gating=True, moe_2layer_gate=False,
                    moe_use_logits_norm=True, moe_gate_norm_std=1.0),
    "two_layer": dict(moe_use_mixtral_gating=False, moe_2layer_gate=True,
                      moe_use_logits_norm=False, moe_feature_no_mul_topk=False),
    "two_layer_norm": dict(moe_use_mixtral_gating=False, moe_2layer_gate=True,
                           moe_use_logits_norm=True, moe_gate_norm_std=0.7,
                           moe_feature_no_mul_topk=True),
    "two_layer_mixtral": dict(moe_use_mixtral_gating=True, moe_2layer_gate=True,
                              moe_use_logits_norm=False),
}


def _their_module():
    spec = importlib.util.spec_from_file_location(
        "moe_plus_plus_layer", os.path.join(HERE, "vendor", "moe_plus_plus_layer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _MLPMoE(torch.nn.Module):
    """MoE++'s FFN expert (modeling_moe_plus_plus.MLPMoE) without its transformers import:
    up_proj [2I, H] whose first I rows are the gate (silu), then down_proj [H, I]."""

    def __init__(self):
        super().__init__()
        self.hidden_size = H
        self.up_proj = torch.nn.Linear(H, 2 * I, bias=False)
        self.down_proj = torch.nn.Linear(I, H, bias=False)

    def forward(self, x):
        gate, up = torch.chunk(self.up_proj(x), 2, dim=-1)
        return self.down_proj(torch.nn.functional.silu(gate) * up)


def their_layer(mod, flags, seed):
    torch.manual_seed(seed)
    moe = mod.MOE(H, _MLPMoE(), num_experts=N, **flags)
    for e in range(E):  # their experts are deep copies of one module: make them differ
        for p in moe.moe.experts.experts[e].parameters():
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    return moe.eval()


def our_config(flags, dtype):
    mixtral = flags["moe_use_mixtral_gating"]
    norm = flags["moe_use_logits_norm"]
    return zm.MoEConfig(
        hidden_size=H, intermediate_size=I, num_experts=E, num_zero_experts=4,
        zero_expert_type=("constant", "constant", "identity", "zero"), top_k=2,
        renormalize=True if mixtral else "drop_zero",
        expert_input_scale=1.0 if mixtral or flags.get("moe_feature_no_mul_topk") else 2.0,
        router_hidden_size=8 * N if flags["moe_2layer_gate"] else None,
        gating_residual=True,
        router_logits_norm_std=flags.get("moe_gate_norm_std", 1.0) if norm else None,
        dtype=dtype)


def our_layer(theirs, cfg):
    """Their module's weights, under their names, into our layer."""
    def host(t):
        return t.detach().float().numpy()
    router, experts = theirs.moe.gate, theirs.moe.experts.experts
    if cfg.router_hidden_size:
        w1, wr = host(router.wg[0].weight), host(router.wg[2].weight)
    else:
        w1, wr = None, host(router.wg.weight)
    zeros_h = np.zeros(H, np.float32)
    return zm.ZeroExpertMoE.from_weights(
        cfg, wr,
        np.stack([host(experts[e].up_proj.weight) for e in range(E)]),
        np.stack([host(experts[e].down_proj.weight) for e in range(E)]),
        const_vec=np.stack([host(experts[E + j].constant) for j in range(2)]
                           + [zeros_h, zeros_h]),
        const_gate=np.stack([host(experts[E + j].wg.weight) for j in range(2)]
                            + [np.zeros((2, H), np.float32)] * 2),
        router_hidden_weight=w1, gate_map=host(router.gate_map.weight))


def run_theirs(theirs, x, prev):
    with torch.no_grad():
        # their layer scales its input in place: hand it a copy
        y, logits = theirs(torch.from_numpy(x.astype(np.float32)).to(theirs_dtype(theirs)),
                           gate_residual=None if prev is None else torch.from_numpy(prev))
    return y.float().numpy(), logits.float().numpy()


def theirs_dtype(theirs):
    return theirs.moe.experts.experts[0].up_proj.weight.dtype


def chosen_ids(theirs, x, prev):
    """The expert ids their gating picks per token (a bool [T, N] membership matrix)."""
    with torch.no_grad():
        info, _ = theirs.moe.gate(torch.from_numpy(x.astype(np.float32)).to(theirs_dtype(theirs)),
                                  None if prev is None else torch.from_numpy(prev))
    member = np.zeros((x.shape[0], N), bool)
    for e, (tokens, _) in info.items():
        member[tokens.numpy(), e] = True
    return member


@pytest.mark.parametrize("mode", sorted(MODES))
def test_matches_their_layer_fp32(mode):
    mod = _their_module()
    flags = MODES[mode]
    cfg = our_config(flags, "float32")
    rng = np.random.default_rng(len(mode))
    xs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(2)]
    prev = ref_prev = None
    hit_zero = 0
    for layer_id, x in enumerate(xs):  # layer 0 gets no residual, layer 1 layer 0's logits
        theirs = their_layer(mod, flags, seed=100 * len(mode) + layer_id)
        ours = our_layer(theirs, cfg)
        x_before = x.copy()
        y_t, L_t = run_theirs(theirs, x, prev)
        y, L = ours(x, prev_router_logits=prev, return_router_logits=True)
        np.testing.assert_array_equal(x, x_before)
        ref, ref_r = ours.reference(x, prev_router_logits=ref_prev)
        assert relative_error(L, L_t) <= 1e-6
        ok = separated_rows(ref_r.router_logits, dict(
            top_k=2, router_logits_norm_std=cfg.router_logits_norm_std))
        assert ok.mean() > 0.9
        member = chosen_ids(theirs, x, prev)
        ours_member = np.zeros_like(member)
        np.put_along_axis(ours_member, ours.route(x, prev_router_logits=prev).topk_ids, True, 1)
        np.testing.assert_array_equal(ours_member[ok], member[ok])
        hit_zero += int(member[:, N - 1].sum())
        assert relative_error(y[ok], y_t[ok]) <= 1e-5
        assert relative_error(y, ref) <= TOL["float32"]
        prev, ref_prev = L, ref_r.router_logits
    assert hit_zero > 0  # the zero expert (dropped in their default gating) was chosen


@pytest.mark.parametrize("mode", ["published_7b", "default", "two_layer_mixtral"])
def test_bf16_from_their_weights_matches_reference(mode):
    # Their bf16 layer runs the gating residual and the sums in bf16, so its output is not
    # the float64 answer; ours must be (bf16 <= 1e-2). Theirs is checked on the rows where
    # both pick the same experts, against the same float64 answer (about 4e-3 there).
    mod = _their_module()
    flags = MODES[mode]
    cfg = our_config(flags, "bfloat16")
    rng = np.random.default_rng(7 + len(mode))
    prev = ref_prev = None
    for layer_id in range(2):
        x = rng.standard_normal((T, H)).astype(np.float32)
        theirs = their_layer(mod, flags, seed=layer_id).to(torch.bfloat16)
        xb = torch.from_numpy(x).to(torch.bfloat16).float().numpy()  # x as bf16 values
        ours = our_layer(theirs, cfg)
        xq = xb.astype(np_dtype("bfloat16"))
        y, L = ours(xq, prev_router_logits=prev, return_router_logits=True)
        ref, ref_r = ours.reference(xq, prev_router_logits=ref_prev)
        assert relative_error(y, ref) <= TOL["bfloat16"]
        assert relative_error(L, ref_r.router_logits) <= 1e-6
        y_t, _ = run_theirs(theirs, xb, prev)
        member = chosen_ids(theirs, xb, prev)
        ours_member = np.zeros_like(member)
        np.put_along_axis(ours_member, ours.route(xq, prev_router_logits=prev).topk_ids, True, 1)
        same = (ours_member == member).all(axis=1)
        assert same.mean() > 0.8
        assert relative_error(y_t[same], ref[same]) <= TOL["bfloat16"]
        prev, ref_prev = L, ref_r.router_logits


@pytest.mark.parametrize("mode", ["default", "published_7b", "two_layer_mixtral"])
def test_their_state_dict_loads_through_from_pretrained(tmp_path, mode):
    # Their modules' state_dicts under the names their decoder gives them
    # (model.layers.L.mlp = MOE), saved as torch pickle shards the way their checkpoints
    # are, with a config.json of their keys: from_pretrained must compute their layers.
    mod = _their_module()
    flags = MODES[mode]
    theirs = [their_layer(mod, flags, seed=31 * L + len(mode)) for L in range(2)]
    config = dict(model_type="MoE++", hidden_size=H, intermediate_size=I, num_experts=[N],
                  num_hidden_layers=2, torch_dtype="float32", **flags)
    (tmp_path / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for L, m in enumerate(theirs):
        fname = f"pytorch_model-0000{L + 1}-of-00002.bin"
        sd = {f"model.layers.{L}.mlp.{k}": v for k, v in m.state_dict().items()}
        torch.save(sd, tmp_path / fname)
        weight_map.update(dict.fromkeys(sd, fname))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": weight_map}))
    rng = np.random.default_rng(3 + len(mode))
    prev = None
    for L, m in enumerate(theirs):
        ours = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=L, device="cpu")
        assert ours.config == our_config(flags, "float32")
        x = rng.standard_normal((T, H)).astype(np.float32)
        y_t, L_t = run_theirs(m, x, prev)
        y, logits = ours(x, prev_router_logits=prev, return_router_logits=True)
        assert relative_error(logits, L_t) <= 1e-6
        ok = separated_rows(logits, dict(top_k=2,
                                         router_logits_norm_std=ours.config.router_logits_norm_std))
        assert ok.mean() > 0.9
        assert relative_error(y[ok], y_t[ok]) <= 1e-5
        prev = logits
