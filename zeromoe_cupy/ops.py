"""One stage at a time, for research code: each op takes and returns arrays of one module
(NumPy in -> NumPy out, CuPy in -> CuPy out) and never modifies its inputs.

    logits = router_logits(x, Wr)                    # (T, H) -> (T, E+Z) fp32
    r = route(logits, top_k, ...)                    # -> RoutingResult(ids, weights, counts)
    out = expert_mlp(x, r.topk_ids, w13, w2)         # -> ExpertOutput(rows, slot_rows)
    y = combine(x, r.topk_ids, r.topk_weights, E, "identity", out)
    z = zero_expert_output(x, r.topk_ids, r.topk_weights, E, "identity")  # zero share alone
"""
from .experts import ExpertOutput, expert_mlp
from .routing import RoutingResult, route, router_logits
from .zero_experts import combine, zero_expert_output

__all__ = ["ExpertOutput", "RoutingResult", "combine", "expert_mlp", "route", "router_logits",
           "zero_expert_output"]
