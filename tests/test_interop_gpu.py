"""DLPack edges with torch on the GPU: zero copies both ways, shared weights, streams,
errors, and the layer against a torch implementation of vLLM's ZeroExpertFusedMoE math."""
import gc
import os
import subprocess
import sys

import pytest

import zeromoe_cupy as zm

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
cp = pytest.importorskip("cupy")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_zero_expert_moe(x, Wr, beta, w13, w2, top_k, rsf, E):
    """vLLM ZeroExpertFusedMoE semantics: softmax routing, bias only selects, rsf on every
    slot, SwiGLU experts, identity zero experts; fp32 sums."""
    I = w13.shape[1] // 2
    p = torch.softmax(x.float() @ Wr.T, -1)
    ids = torch.topk(p + beta, top_k, -1)[1]
    w = p.gather(1, ids) * rsf
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids[ids < E].unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        gu = (x[tok] @ w13[e].T).float()
        h = (torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]).to(x.dtype)
        out.index_add_(0, tok, (h @ w2[e].T).float() * w[tok, slot, None])
    zmask = ids >= E
    out += (w * zmask).sum(-1, keepdim=True) * x.float()
    return out.to(x.dtype)


def _small(dtype=torch.bfloat16, E=16, Z=8, H=256, I=128, K=4):
    cfg = zm.MoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_zero_experts=Z,
                       top_k=K, use_correction_bias=True, routed_scaling_factor=2.0,
                       dtype={torch.bfloat16: "bfloat16", torch.float16: "float16",
                              torch.float32: "float32"}[dtype])
    g = torch.Generator(device="cuda").manual_seed(0)
    Wr = torch.randn(E + Z, H, device="cuda", generator=g) * H ** -0.5
    beta = torch.randn(E + Z, device="cuda", generator=g) * 0.01
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * I ** -0.5).to(dtype)
    return cfg, Wr, beta, w13, w2


def test_zero_copy_in_and_out_and_shared_weights():
    cfg, Wr, beta, w13, w2 = _small()
    layer = zm.ZeroExpertMoE.from_weights(cfg, router_weight=Wr, w13=w13, w2=w2,
                                          e_score_correction_bias=beta)
    assert layer.w13.data.ptr == w13.data_ptr() and layer.w2.data.ptr == w2.data_ptr()
    assert layer.router_weight.data.ptr == Wr.data_ptr()
    x = torch.randn(64, 256, device="cuda").bfloat16()
    assert zm._arrays.as_array(x, "x").data.ptr == x.data_ptr()
    y = layer(x)
    assert isinstance(y, cp.ndarray) and y.dtype == layer.w13.dtype
    yt = torch.from_dlpack(y)
    assert yt.data_ptr() == y.data.ptr and yt.dtype == torch.bfloat16
    before = yt.clone()
    w2.mul_(2.0)  # the layer shares the tensor: its real experts' output doubles
    cp.cuda.Device().synchronize()
    after = torch.from_dlpack(layer(x))
    assert not torch.equal(after, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_torch_reference_small(dtype):
    cfg, Wr, beta, w13, w2 = _small(dtype)
    layer = zm.ZeroExpertMoE.from_weights(cfg, router_weight=Wr, w13=w13, w2=w2,
                                          e_score_correction_bias=beta)
    x = torch.randn(300, 256, device="cuda").to(dtype)
    y = torch.from_dlpack(layer(x)).float()
    ref = torch_zero_expert_moe(x, Wr, beta, w13, w2, 4, 2.0, 16).float()
    assert ((y - ref).norm() / ref.norm()).item() <= 1e-2


def test_matches_torch_reference_at_longcat_shape():
    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()
    cfg = zm.MoEConfig.preset("longcat-flash")
    H, I, E, N = 6144, 2048, 512, 768
    g = torch.Generator(device="cuda").manual_seed(1)
    Wr = torch.randn(N, H, device="cuda", generator=g) * H ** -0.5
    beta = torch.zeros(N, device="cuda")
    beta[E:] = 0.002
    w13 = torch.empty(E, 2 * I, H, device="cuda", dtype=torch.bfloat16)
    w2 = torch.empty(E, H, I, device="cuda", dtype=torch.bfloat16)
    for s in range(0, E, 64):
        w13[s:s + 64] = torch.randn(64, 2 * I, H, device="cuda", generator=g) * H ** -0.5
        w2[s:s + 64] = torch.randn(64, H, I, device="cuda", generator=g) * I ** -0.5
    layer = zm.ZeroExpertMoE.from_weights(cfg, router_weight=Wr, w13=w13, w2=w2,
                                          e_score_correction_bias=beta)
    x = torch.randn(256, H, device="cuda", generator=g).bfloat16()
    y = torch.from_dlpack(layer(x)).float()
    ref = torch_zero_expert_moe(x, Wr, beta, w13, w2, 12, 6.0, E).float()
    assert ((y - ref).norm() / ref.norm()).item() <= 1e-2
    del layer, w13, w2
    torch.cuda.empty_cache()


def test_torch_side_stream_needs_no_extra_synchronization():
    cfg, Wr, beta, w13, w2 = _small(E=32, Z=16, H=1024, I=512, K=6)
    layer = zm.ZeroExpertMoE.from_weights(cfg, router_weight=Wr, w13=w13, w2=w2,
                                          e_score_correction_bias=beta)
    side = torch.cuda.Stream()
    expected = None
    for i in range(20):
        with torch.cuda.stream(side):
            base = torch.randn(8192, 1024, device="cuda", generator=torch.Generator(
                device="cuda").manual_seed(7))
            x = (base * 1.0 + 0.0).bfloat16()  # produced by torch on the side stream
            with cp.cuda.Stream.from_external(side):
                y = torch.from_dlpack(layer(x))
            total = y.float().sum()  # consumed by torch at once, same stream
        side.synchronize()
        if expected is None:
            expected = total.item()
            ref = torch_zero_expert_moe(x, Wr, beta, w13, w2, 6, 2.0, 32).float()
            assert ((y.float() - ref).norm() / ref.norm()).item() <= 1e-2
        assert total.item() == expected


def test_torch_errors_say_what_to_do():
    cfg, Wr, beta, w13, w2 = _small()
    layer = zm.ZeroExpertMoE.from_weights(cfg, router_weight=Wr, w13=w13, w2=w2,
                                          e_score_correction_bias=beta)
    with pytest.raises(ValueError, match="detach"):
        layer(torch.randn(4, 256, device="cuda", requires_grad=True).bfloat16())
    with pytest.raises(TypeError, match="cupy.asarray|tensor.cuda"):
        layer(torch.randn(4, 256).bfloat16())
    with pytest.raises(ValueError, match="detach"):
        zm.ZeroExpertMoE.from_weights(cfg, router_weight=Wr.requires_grad_(), w13=w13, w2=w2)


def test_non_contiguous_and_misaligned_torch_inputs():
    cfg, Wr, beta, w13, w2 = _small()
    layer = zm.ZeroExpertMoE.from_weights(cfg, router_weight=Wr, w13=w13, w2=w2,
                                          e_score_correction_bias=beta)
    big = torch.randn(64, 257, device="cuda").bfloat16()
    x = big[:, 1:]  # misaligned rows with a stride of 257
    y = torch.from_dlpack(layer(x)).float()
    y_ref = torch.from_dlpack(layer(x.contiguous())).float()
    assert torch.equal(y, y_ref)
    xt = torch.randn(256, 64, device="cuda").bfloat16().t()  # transposed view
    assert torch.equal(torch.from_dlpack(layer(xt)), torch.from_dlpack(layer(xt.contiguous())))


@pytest.mark.parametrize("example,args", [("torch_interop.py", []), ("quickstart.py",
                         ["--device", "cuda"]), ("moepp_layer.py", ["--device", "cuda"]),
                         ("longcat_layer.py", ["512"])])
def test_gpu_examples(example, args):
    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", example), *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok" in res.stdout and "skipped" not in res.stdout, res.stdout
