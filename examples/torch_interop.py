"""torch tensors in, torch tensors out, without copies; checked against a torch reference.

The weights are torch CUDA tensors that the layer wraps through DLPack (changing them in torch
changes the layer), the input comes from torch, and the output goes back to torch; the layer
runs on torch's current stream.
"""
import sys

try:
    import torch
except ImportError:
    print("skipped: needs torch")
    sys.exit(0)
if not torch.cuda.is_available():
    print("skipped: needs a CUDA GPU")
    sys.exit(0)

import cupy as cp  # noqa: E402

import zeromoe_cupy as zm  # noqa: E402

torch.manual_seed(0)
cfg = zm.MoEConfig(hidden_size=512, intermediate_size=256, num_experts=32, num_zero_experts=16,
                   top_k=6, use_correction_bias=True, routed_scaling_factor=2.5,
                   dtype="bfloat16")
H, I, E, N = 512, 256, 32, 48
dev = "cuda"
Wr = torch.randn(N, H, device=dev) * H ** -0.5
beta = torch.zeros(N, device=dev)
w13 = (torch.randn(E, 2 * I, H, device=dev) * H ** -0.5).bfloat16()
w2 = (torch.randn(E, H, I, device=dev) * I ** -0.5).bfloat16()
layer = zm.ZeroExpertMoE.from_weights(cfg, router_weight=Wr, w13=w13, w2=w2,
                                      e_score_correction_bias=beta)
shared = layer.w13.data.ptr == w13.data_ptr()
print(f"weights shared with torch (no copy): {shared}")

x = torch.randn(200, H, device=dev).bfloat16()
with cp.cuda.Stream.from_external(torch.cuda.current_stream()):
    y = torch.from_dlpack(layer(x))
print(f"output is a torch tensor on {y.device}, dtype {y.dtype}")


def torch_reference(x):
    p = torch.softmax(x.float() @ Wr.T, -1)
    ids = torch.topk(p + beta, cfg.top_k, -1)[1]
    w = p.gather(1, ids) * cfg.routed_scaling_factor
    out = torch.zeros_like(x, dtype=torch.float32)
    for k in range(cfg.top_k):
        for e in ids[:, k].unique().tolist():
            tok = (ids[:, k] == e).nonzero(as_tuple=True)[0]
            if e < E:
                gu = x[tok].float() @ w13[e].float().T
                f = (torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]) @ w2[e].float().T
            else:
                f = x[tok].float()  # identity expert
            out[tok] += w[tok, k, None] * f
    return out


ref = torch_reference(x)
err = ((y.float() - ref).norm() / ref.norm()).item()
ok = shared and err <= 1e-2
print(f"relative error against the torch reference: {err:.2e} ({'ok' if ok else 'FAIL'})")
sys.exit(0 if ok else 1)
