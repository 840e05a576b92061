"""Expert parallelism (docs/spec.md "Expert parallelism"): the real experts spread over R ranks,
the router and the zero experts on every rank.

- ``init()``: the NCCL group of this process, from the launcher's environment (torchrun,
  mpirun, srun, or ``zeromoe launch -n N``); ``local_groups(R)`` / ``run_local(fn, R)``: R
  ranks as threads of one process (NumPy, or CuPy on one GPU).
- ``ZeroExpertMoE(..., group=g)`` / ``ZeroExpertMoE.from_weights(..., group=g)``: a rank's
  layer; its forward exchanges rows through ``Exchange`` (dispatch / combine).
- ``gather_layer(rank_layers)``: the whole layer from the R rank layers of one process.
- ``launch.launch(n, argv)``: ``zeromoe launch -n N script.py``.
"""
from .exchange import Dispatched, Exchange, ExchangeStats, ep_forward
from .group import Group, LocalGroup, NcclGroup, local_groups, run_local
from .launch import RankInfo, init, rank_info, rendezvous

__all__ = ["Dispatched", "Exchange", "ExchangeStats", "Group", "LocalGroup", "NcclGroup",
           "RankInfo", "ep_forward", "gather_layer", "init", "local_groups",
           "rank_info", "rendezvous", "run_local"]


def gather_layer(rank_layers):
    """The single (group-less) layer whose experts are those of ``rank_layers`` (one per rank,
    any order) concatenated in rank order; router, biases and zero experts from rank 0. For
    testing rank layers against the whole layer (``.reference()``)."""
    from ..layer import ZeroExpertMoE
    layers = list(rank_layers)
    if not layers or not all(isinstance(la, ZeroExpertMoE) and la.group is not None
                             for la in layers):
        raise TypeError("rank_layers: expected the rank layers (ZeroExpertMoE with a group), "
                        f"one per rank, got {[type(la).__name__ for la in layers]}")
    layers.sort(key=lambda layer: layer.group.rank)
    ranks = [layer.group.rank for layer in layers]
    if ranks != list(range(layers[0].group.world_size)):
        raise ValueError(f"rank_layers: expected one layer per rank 0..R-1, got ranks {ranks}")
    first = layers[0]
    xp = first.xp
    return ZeroExpertMoE.from_weights(
        first.config, first.router_weight, xp.concatenate([la.w13 for la in layers]),
        xp.concatenate([la.w2 for la in layers]), first.e_score_correction_bias,
        first.router_bias, first.const_vec, first.const_gate, first.max_chunk_tokens,
        router_hidden_weight=first.router_hidden_weight, gate_map=first.gate_map,
        w13_scale_inv=None if first.w13_scale_inv is None else xp.concatenate(
            [la.w13_scale_inv for la in layers]),
        w2_scale_inv=None if first.w2_scale_inv is None else xp.concatenate(
            [la.w2_scale_inv for la in layers]),
        expert_strategy=first.expert_strategy, router_gemm=first.router_gemm,
        deterministic=first.deterministic)
