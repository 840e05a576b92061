"""Peer implementations in torch, for `zeromoe bench --peers torch` only (never imported
otherwise). Both compute docs/spec.md for identity/zero experts with the layer's own weights,
shared through DLPack; the bench checks their output against ours before timing them."""
from __future__ import annotations


def make(names, layer):
    try:
        import torch
    except ImportError:
        print("torch is not importable: no peers")
        return {}
    cfg = layer.config
    if cfg.has_constant_experts:
        print("torch peers implement identity/zero experts only: skipped")
        return {}
    td = torch.from_dlpack
    Wr = td(layer.router_weight)
    bias = td(layer.e_score_correction_bias) if layer.e_score_correction_bias is not None else None
    w13, w2 = td(layer.w13), td(layer.w2)
    E, I = cfg.num_experts, cfg.intermediate_size
    ident = torch.tensor([t == "identity" for t in cfg.zero_types], device=w13.device)

    def routing(x):
        logits = x.float() @ Wr.T
        p = torch.softmax(logits, -1) if cfg.scoring_func == "softmax" else torch.sigmoid(logits)
        s = p + bias if bias is not None else p
        if cfg.num_expert_group:
            G = cfg.num_expert_group
            gs = s.view(s.shape[0], G, -1)
            gscore = gs.topk(2 if bias is not None else 1, -1)[0].sum(-1)
            keep = gscore.topk(cfg.topk_group, -1)[1]
            mask = torch.zeros_like(gscore).scatter_(1, keep, 1).bool()
            s = s.masked_fill(~mask.repeat_interleave(s.shape[1] // G, 1), float("-inf"))
        ids = s.topk(cfg.top_k, -1)[1]
        w = p.gather(1, ids)
        if cfg.renormalize:
            w = w / w.sum(-1, keepdim=True)
        return ids, w * cfg.routed_scaling_factor

    def zero_share(x, ids, w):
        z = ids >= E
        zi = torch.where(z, ids - E, 0)
        coef = (w * (z & ident[zi])).sum(-1, keepdim=True)
        return coef * x.float()

    def loop_peer(x):
        x = td(x)
        ids, w = routing(x)
        y = zero_share(x, ids, w)
        for e in torch.unique(ids[ids < E]).tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            gu = x[tok] @ w13[e].T
            h = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
            y.index_add_(0, tok, (h @ w2[e].T).float() * w[tok, slot, None])
        return y.to(x.dtype)

    def grouped_peer(x):
        x = td(x)
        ids, w = routing(x)
        y = zero_share(x, ids, w)
        flat = ids.reshape(-1)
        real = (flat < E).nonzero(as_tuple=True)[0]
        order = real[torch.argsort(flat[real], stable=True)]
        counts = torch.bincount(flat[order], minlength=E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[order // cfg.top_k]
        gu = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
        h = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
        out = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
        y.index_add_(0, order // cfg.top_k, out.float() * w.reshape(-1)[order, None])
        return y.to(x.dtype)

    peers = {}
    for name in names:
        if name == "torch":
            peers["torch-loop"] = loop_peer
            if hasattr(torch, "_grouped_mm"):
                peers["torch-grouped"] = grouped_peer
        elif name == "vllm":
            fused = _vllm_fused_experts()
            if fused is not None:
                peers["vllm"] = _vllm_peer(fused, routing, zero_share, w13, w2, E,
                                           cfg.num_total_experts)
        else:
            raise ValueError(f"--peers: unknown peer {name!r} (known: torch, vllm)")
    return peers


def _vllm_fused_experts():
    """vLLM's fused_experts (its Triton MoE kernels) if vLLM imports, else None."""
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    except Exception as exc:  # not installed, or no build for this machine
        print(f"vllm is not importable ({type(exc).__name__}): no vllm peer")
        return None
    return fused_experts


def _vllm_peer(fused_experts, routing, zero_share, w13, w2, E, N):
    """Our routing, the zero experts' share in torch, the real slots through vLLM's kernels
    (zero-expert slots mapped to -1 by an expert map, as vLLM serves LongCat-Flash)."""
    import torch
    expert_map = torch.full((N,), -1, dtype=torch.int32, device=w13.device)
    expert_map[:E] = torch.arange(E, dtype=torch.int32, device=w13.device)

    def peer(x):
        x = torch.from_dlpack(x)
        ids, w = routing(x)
        y = zero_share(x, ids, w)
        real = fused_experts(x, w13, w2, w.float(), ids.to(torch.int32),
                             global_num_experts=N, expert_map=expert_map)
        return (y + real.float()).to(x.dtype)
    return peer
