"""Checkpoints written by transformers itself: tiny LongcatFlash and DeepseekV3 models,
save_pretrained (one file and sharded), loaded back through from_hf_config + from_pretrained,
compared with transformers' own MoE block on the same tokens (fp32).

Needs torch and transformers (the `interop` extra); skipped without them.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import zeromoe_cupy as zm  # noqa: E402

H, I = 32, 24


def _longcat(zero_expert_type=None):
    cfg = transformers.LongcatFlashConfig(
        vocab_size=64, hidden_size=H, num_layers=2, num_attention_heads=2, ffn_hidden_size=48,
        q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        head_dim=8, moe_topk=4, n_routed_experts=6, zero_expert_num=3, expert_ffn_hidden_size=I,
        routed_scaling_factor=2.5)
    return transformers.LongcatFlashForCausalLM(cfg), "longcat"


def _deepseek():
    cfg = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=H, intermediate_size=48, moe_intermediate_size=I,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=2.0, kv_lora_rank=8, q_lora_rank=16,
        qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_group=4, topk_group=2,
        num_experts_per_tok=3, first_k_dense_replace=1, norm_topk_prob=True)
    return transformers.DeepseekV3ForCausalLM(cfg), "deepseek"


def _spread_router(mlp, kind, gen):
    """Router weights of a trained-looking scale (logits ~ N(0, 1)) and a random correction
    bias, so that routing decisions are far from ties (the init's 0.02 makes them all near)."""
    with torch.no_grad():
        router = mlp.router if kind == "longcat" else mlp.gate
        w = router.classifier.weight if kind == "longcat" else router.weight
        w.copy_(torch.randn(w.shape, generator=gen) * H ** -0.5)
        b = router.e_score_correction_bias
        b.copy_(torch.randn(b.shape, generator=gen) * 0.05)


def _hf_moe_output(mlp, kind, x):
    """transformers' MoE block on x [T, H]: LongcatFlash's whole mlp; DeepseekV3's routed
    experts only (its shared experts are not part of this layer)."""
    with torch.no_grad():
        t = torch.from_numpy(x)[None]
        if kind == "longcat":
            return mlp(t)[0].numpy()
        _, weights, ids = mlp.gate(t)
        return mlp.experts(t.view(-1, H), ids, weights).numpy()


@pytest.mark.parametrize("build", [_longcat, _deepseek])
@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_transformers_checkpoint_matches_transformers_moe(tmp_path, build, max_shard_size):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model, kind = build()
    model = model.float().eval()
    L = 1
    mlp = model.model.layers[L].mlp
    _spread_router(mlp, kind, gen)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(tmp_path, **kw)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_size is not None)

    cfg = zm.MoEConfig.from_hf_config(tmp_path)
    layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=L, device="cpu")
    assert layer.config == cfg and cfg.dtype == "float32"
    x = np.random.default_rng(2).standard_normal((40, H)).astype(np.float32)
    y = layer(x)
    y_hf = _hf_moe_output(mlp, kind, x)
    assert zm.reference.relative_error(y, y_hf.astype(np.float64)) <= 1e-5
    y_ref, _ = layer.reference(x)
    assert zm.reference.relative_error(y, y_ref) <= 1e-5
    if kind == "deepseek":
        with pytest.raises(ValueError, match="dense"):
            zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=0, device="cpu")


def test_bf16_checkpoint_against_float64(tmp_path):
    # bf16 on disk: transformers would round the router to bf16 too; we keep it fp32, so
    # compare with the float64 reference of the loaded weights rather than with transformers.
    torch.manual_seed(0)
    model, kind = _longcat()
    _spread_router(model.model.layers[0].mlp, kind, torch.Generator().manual_seed(3))
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="30KB")
    layer = zm.ZeroExpertMoE.from_pretrained(tmp_path, layer=0, device="cpu")
    assert layer.config.dtype == "bfloat16"
    x = np.random.default_rng(4).standard_normal((33, H)).astype(np.float32)
    x = x.astype(layer.w13.dtype)
    y_ref, _ = layer.reference(x)
    assert zm.reference.relative_error(layer(x), y_ref) <= 1e-2
    # The experts are transformers' own weights, bit for bit.
    want = model.model.layers[0].mlp.experts.down_proj.detach().float().numpy()
    np.testing.assert_array_equal(layer.w2.astype(np.float32), want)
