"""A plain float64 NumPy evaluation of docs/spec.md: the oracle for tests, the demo and the bench.

Written for clarity, not speed: loops over tokens and slots are fine here.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class ReferenceRouting(NamedTuple):
    topk_ids: np.ndarray       # int64 [T, K]
    topk_weights: np.ndarray   # float64 [T, K]
    selection_scores: np.ndarray  # float64 [T, E+Z], after bias and group masking (-inf masked)
    router_logits: np.ndarray | None = None  # float64 [T, E+Z]: L after the gating residual,
                                             # before the normalization (forward only)


def _rank(s: np.ndarray, logits: np.ndarray, allowed: np.ndarray, bias=None) -> list:
    """Indices in rank order: descending s, NaN below every number (-inf included), and
    experts that are not ``allowed`` (dropped groups) last. Among equal finite s: if the
    allowed experts holding that value all have the same bias (``bias`` None: no bias), the
    larger logit first (their scores are then in the logits' order, which is the exact
    order where the sums tie by rounding or underflow), then the lower index; otherwise the
    lower index."""
    same_bias = {}  # finite s value -> whether its allowed holders share one bias
    for i in range(s.shape[0]):
        if allowed[i] and np.isfinite(s[i]):
            b = 0.0 if bias is None else float(bias[i])
            first, uniform = same_bias.get(s[i], (b, True))
            same_bias[s[i]] = (first, uniform and b == first)

    def key(i):
        if not allowed[i]:
            return (0, 0.0, 0.0, -i)
        if np.isnan(s[i]):
            return (1, 0.0, 0.0, -i)
        if not np.isfinite(s[i]) or not same_bias[s[i]][1]:
            return (2, s[i], 0.0, -i)
        return (2, s[i], logits[i], -i)
    return sorted(range(s.shape[0]), key=key, reverse=True)


def _log_scores(L: np.ndarray, scoring_func: str) -> np.ndarray:
    """log p, computed so that it never underflows for finite logits (NaN where p is)."""
    with np.errstate(all="ignore"):
        if scoring_func == "softmax":
            m = np.max(L, axis=1, keepdims=True) if L.shape[1] else L
            z = L - m
            return z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
        return -np.logaddexp(0.0, -L)


def normalize_logits(L, sigma: float) -> np.ndarray:
    """L / (std(L) / sigma) per row, std unbiased over the row; rows with std 0 keep L."""
    L = np.asarray(L, np.float64)
    N = L.shape[1]
    with np.errstate(all="ignore"):
        std = np.sqrt(np.sum((L - L.mean(axis=1, keepdims=True)) ** 2, axis=1, keepdims=True)
                      / max(N - 1, 1))
        return np.where(std == 0, L, L / (std / sigma))


def route(logits, top_k: int, scoring_func: str = "softmax", correction_bias=None,
          renormalize=False, routed_scaling_factor: float = 1.0,
          num_expert_group: int | None = None, topk_group: int | None = None, *,
          drop_experts=None, logits_norm_std: float | None = None) -> ReferenceRouting:
    """docs/spec.md steps 2-7 on logits [T, E+Z], in float64.

    Renormalized weights are evaluated in the log domain (exp(log p_k - max) / sum), so they
    stay finite when every chosen score underflows. ``renormalize`` False / True /
    "drop_zero" (then ``drop_experts``, bool [E+Z], flags the experts whose slots weigh 0
    before the renormalization; all 0 when every slot is flagged). ``logits_norm_std``: the
    scores use L / (std(L) / sigma) (docs/spec.md "MoE++ options").
    """
    L = np.asarray(logits, dtype=np.float64)
    if logits_norm_std is not None:
        L = normalize_logits(L, logits_norm_std)
    T, N = L.shape
    with np.errstate(all="ignore"):
        if scoring_func == "softmax":
            m = np.max(L, axis=1, keepdims=True) if N else L
            e = np.exp(L - m)
            p = e / np.sum(e, axis=1, keepdims=True)
        elif scoring_func == "sigmoid":
            p = 1.0 / (1.0 + np.exp(-L))
        else:
            raise ValueError(f"scoring_func: {scoring_func!r}")
    bias = None if correction_bias is None else np.asarray(correction_bias, np.float64)
    s = p + bias[None, :] if bias is not None else p.copy()
    ids = np.zeros((T, top_k), np.int64)
    masked = np.array(s, copy=True)
    everyone = np.ones(N, bool)
    for t in range(T):
        allowed_e = everyone
        if num_expert_group is not None:
            G = num_expert_group
            gs = N // G
            best = min(2 if correction_bias is not None else 1, gs)
            tops = [g * gs + np.asarray(
                _rank(s[t, g * gs:(g + 1) * gs], L[t, g * gs:(g + 1) * gs], everyone[:gs],
                      None if bias is None else bias[g * gs:(g + 1) * gs])[:best])
                for g in range(G)]
            if bias is None:  # the group's largest logit, exact where its score rounds to 1
                # or underflows (docs/spec.md); NaN where the score is (0 * s)
                with np.errstate(invalid="ignore"):
                    gscore = np.array([L[t, i[0]] + 0.0 * s[t, i[0]] for i in tops])
            else:
                gscore = np.array([np.sum(s[t, i]) for i in tops])
            keep = _rank(gscore, np.zeros(G), np.ones(G, bool))[:topk_group]
            allowed = np.zeros(G, bool)
            allowed[keep] = True
            allowed_e = np.repeat(allowed, gs)
            masked[t, ~allowed_e] = -np.inf
        ids[t] = _rank(s[t], L[t], allowed_e, bias)[:top_k]
    if isinstance(renormalize, str) and renormalize != "drop_zero":
        raise ValueError(f"renormalize: {renormalize!r}")
    if renormalize:
        lp = np.take_along_axis(_log_scores(L, scoring_func), ids, axis=1)
        dropped = np.zeros(ids.shape, bool)
        if renormalize == "drop_zero":
            dropped = np.asarray(drop_experts, bool)[ids]
            lp = np.where(dropped, -np.inf, lp)
        with np.errstate(all="ignore"):
            e = np.where(dropped, 0.0, np.exp(lp - np.max(lp, axis=1, keepdims=True)))
            total = np.sum(e, axis=1, keepdims=True)
            w = e / np.where(dropped.all(axis=1, keepdims=True), 1.0, total)  # all dropped: 0
    else:
        w = np.take_along_axis(p, ids, axis=1)
    w = w * routed_scaling_factor
    return ReferenceRouting(ids, w, masked)


def _silu(v):
    with np.errstate(over="ignore"):  # exp(-v) = inf for v << 0: silu is -0 there
        return v / (1.0 + np.exp(-v))


def _e4m3(v32: np.ndarray) -> np.ndarray:
    """fp32 -> the nearest e4m3 value (round to nearest even, saturating at +-448), float64."""
    import ml_dtypes
    return np.clip(v32, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def fp8_dequantize(q, scale_inv, glu: bool) -> np.ndarray:
    """One expert's e4m3 weight [N, K] (float8_e4m3fn or uint8 bits) times its 128x128 block
    scales, in float64. ``glu``: gate rows then up rows, each blocked from its own row 0."""
    import ml_dtypes
    q = np.asarray(q)
    if q.dtype == np.uint8:
        q = q.view(ml_dtypes.float8_e4m3fn)
    w = q.astype(np.float64)
    s = np.asarray(scale_inv, np.float64)
    halves = (w[:w.shape[0] // 2], w[w.shape[0] // 2:]) if glu else (w,)
    out, s_row = [], 0
    for half in halves:
        n, k = half.shape
        nb = -(-n // 128)
        full = np.repeat(np.repeat(s[s_row:s_row + nb], 128, 0), 128, 1)[:n, :k]
        out.append(half * full)
        s_row += nb
    return np.concatenate(out, axis=0)


def fp8_activation(a) -> np.ndarray:
    """a' = e4m3(a / sa) * sa per group of 128 features, sa = max(max|a|, 1e-10) / 448, all
    from fp32 (docs/spec.md); returned in float64."""
    a32 = np.asarray(a, np.float64).astype(np.float32)
    out = np.empty(a32.shape, np.float64)
    for g in range(0, a32.shape[0], 128):
        grp = a32[g:g + 128]
        sa = np.float32(max(float(np.max(np.abs(grp))), 1e-10)) / np.float32(448)
        out[g:g + 128] = _e4m3(grp / sa) * np.float64(sa)
    return out


def _expect_shape(name: str, a, shape: tuple) -> None:
    """ValueError naming ``name`` unless ``a`` has ``shape`` (a str entry: any length). An
    object without a shape that is not a list (a per-expert accessor: ``a[e]`` only) passes."""
    if not hasattr(a, "shape") and not isinstance(a, (list, tuple)):
        return
    got = tuple(np.shape(a))
    if len(got) != len(shape) or any(not isinstance(s, str) and g != s
                                     for g, s in zip(got, shape)):
        want = "[" + ", ".join(str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {got}")


def forward(x, router_weight, w13, w2, *, top_k: int, num_experts: int,
            zero_expert_type: str | Sequence[str] = "identity", scoring_func: str = "softmax",
            correction_bias=None, router_bias=None, renormalize=False,
            routed_scaling_factor: float = 1.0, num_expert_group: int | None = None,
            topk_group: int | None = None, const_vec=None, const_gate=None,
            router_logits=None, routing=None, w13_scale_inv=None,
            w2_scale_inv=None, expert_input_scale: float = 1.0,
            router_hidden_weight=None, gate_map=None, prev_router_logits=None,
            router_logits_norm_std: float | None = None) -> tuple[np.ndarray, ReferenceRouting]:
    """docs/spec.md steps 1-9 and its "MoE++ options" in float64. Returns (y float64 [T, H],
    routing); ``routing.router_logits`` is L after the gating residual, before normalization.

    ``routing`` (ids, weights) may be given to evaluate the experts for a fixed routing.
    With ``w13_scale_inv`` / ``w2_scale_inv`` the experts are FP8 (docs/spec.md "FP8 experts"):
    w13 / w2 hold e4m3 values, dequantized per block; each GEMM's input is quantized per 128
    features; gate and up are rounded to x's dtype; h is quantized from fp32.
    ``router_hidden_weight`` W1 [R, H]: the two-layer router L = W2 @ tanh(W1 @ x), W2 =
    ``router_weight`` [E+Z, R]. ``gate_map`` [E+Z, E+Z] with ``prev_router_logits`` [T, E+Z]:
    L += gate_map @ L_prev. ``expert_input_scale`` s: the experts read s * x rounded to x's
    dtype. ``renormalize="drop_zero"`` drops the "zero"-type experts' slots.
    """
    fp8 = w13_scale_inv is not None
    x_dtype = np.asarray(x).dtype
    x64 = np.asarray(x, dtype=np.float64)
    _expect_shape("x", x64, ("T", "H"))
    T, H = x64.shape
    _expect_shape("w13", w13, (num_experts, "2I", H))
    if hasattr(w13, "shape") or isinstance(w13, (list, tuple)):
        _expect_shape("w2", w2, (num_experts, H, np.shape(w13)[1] // 2))
    if routing is None and router_logits is None:
        if router_hidden_weight is not None:
            _expect_shape("router_hidden_weight", router_hidden_weight, ("R", H))
            H_router = np.shape(router_hidden_weight)[0]
        else:
            H_router = H
        _expect_shape("router_weight", router_weight, ("E+Z", H_router))
    types = zero_expert_type
    L = None
    if routing is None:
        if router_logits is None:
            if router_hidden_weight is not None:
                hidden = np.tanh(x64 @ np.asarray(router_hidden_weight, np.float64).T)
                L = hidden @ np.asarray(router_weight, np.float64).T
            else:
                L = x64 @ np.asarray(router_weight, np.float64).T
            if router_bias is not None:
                L = L + np.asarray(router_bias, np.float64)[None, :]
            if prev_router_logits is not None:
                L = L + np.asarray(prev_router_logits, np.float64) @ \
                    np.asarray(gate_map, np.float64).T
        else:
            L = np.asarray(router_logits, np.float64)
        Z = L.shape[1] - num_experts
        kinds = [types] * Z if isinstance(types, str) else list(types)
        drop = [False] * num_experts + [k == "zero" for k in kinds]
        routing = route(L, top_k, scoring_func, correction_bias, renormalize,
                        routed_scaling_factor, num_expert_group, topk_group,
                        drop_experts=drop if renormalize == "drop_zero" else None,
                        logits_norm_std=router_logits_norm_std)
    ids, w = np.asarray(routing[0]), np.asarray(routing[1], np.float64)  # (ids, weights, ...)
    if expert_input_scale != 1:
        # every expert reads s * x rounded to x's dtype (the router read x)
        x64 = (x64 * expert_input_scale).astype(np.asarray(x).dtype).astype(np.float64)
    y = np.zeros((T, H), np.float64)
    # NaN / Inf in x give NaN rows (the documented result), without warnings.
    with np.errstate(all="ignore"):
        for t in range(T):
            for k in range(ids.shape[1]):
                e = int(ids[t, k])
                if e < num_experts and fp8:
                    W13 = fp8_dequantize(w13[e], w13_scale_inv[e], glu=True)
                    I = W13.shape[0] // 2
                    gu = (W13 @ fp8_activation(x64[t])).astype(x_dtype).astype(np.float64)
                    h = _silu(gu[:I]) * gu[I:]
                    out = fp8_dequantize(w2[e], w2_scale_inv[e], glu=False) @ fp8_activation(h)
                elif e < num_experts:
                    W13 = np.asarray(w13[e], np.float64)
                    I = W13.shape[0] // 2
                    h = _silu(W13[:I] @ x64[t]) * (W13[I:] @ x64[t])
                    out = np.asarray(w2[e], np.float64) @ h
                else:
                    j = e - num_experts
                    kind = types if isinstance(types, str) else types[j]
                    if kind == "identity":
                        out = x64[t]
                    elif kind == "zero":
                        out = np.zeros(H)
                    elif kind == "constant":
                        g = np.asarray(const_gate[j], np.float64) @ x64[t]
                        a = np.exp(g - g.max())
                        a = a / a.sum()
                        out = a[0] * x64[t] + a[1] * np.asarray(const_vec[j], np.float64)
                    else:
                        raise ValueError(f"zero_expert_type: {kind!r}")
                y[t] += w[t, k] * out
    return y, ReferenceRouting(ids, w, None, L)


def relative_error(y, ref) -> float:
    """||y - ref|| / ||ref|| (Frobenius norms, in float64); ||y - ref|| itself where ref is all
    zeros (0 when both are empty or equal). y and ref: arrays of one shape, or shapes that
    differ only by axes of length 1; anything else raises ValueError (NumPy would broadcast a
    (1, H) row against (T, H) and hide the other rows' errors)."""
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    if y.shape != ref.shape:
        if y.squeeze().shape != ref.squeeze().shape:
            raise ValueError(f"y: expected ref's shape {ref.shape}, got {y.shape}")
        y, ref = y.squeeze(), ref.squeeze()
    den = np.linalg.norm(ref)
    num = np.linalg.norm(y - ref)
    if den == 0:
        return float(num)
    return float(num / den)
