"""Dispatch and combine for expert parallelism (docs/spec.md "Expert parallelism"), and the forward
of a rank layer built on them.

Rank r holds the real experts [r*E/R, (r+1)*E/R) and all zero experts. Per forward on its
tokens x [T, H] (T may be 0):

- ``dispatch``: the rows each rank needs. A token goes ONCE to every rank that holds at least
  one of its real experts (zero-expert slots never leave the rank), with its K slot ids in
  that rank's numbering (-1 for slots elsewhere) and its K weights. The sizes are exchanged
  first: one host synchronization per call.
- the destination runs its local experts on the received rows (``run_experts``, any strategy;
  slots with id -1 are skipped by every path) and weights and sums each row's slots in fp32
  (``combine`` with no zero experts), one row per (token, rank): in x's dtype, fp32 for
  float16 layers.
- ``combine``: those rows go back; the home rank adds the zero experts' share and every
  rank's row in fp32 (one ``combine`` pass over K + R slots) and casts once.

Rows travel back in x's dtype: a bf16 partial sum is rounded once (relative 2**-9), the same
rounding each expert row gets on one GPU, and its fp32 sum with the other ranks' rows keeps
the result within docs/spec.md's tolerance (twice the single layer's error) while halving the
combine traffic against fp32. float16 layers send fp32 rows: one rank's partial sum may pass
65504 where y, the sum over ranks, fits (docs/spec.md, "Numerics and accuracy"), as the
single layer's expert rows may.

Not graph-capturable: the sizes cross to the host once per call. A capturable variant would
give every (source, destination) pair a fixed capacity of rows (e.g. T_max per rank, or a
configured cap with an overflow error flag read later), exchange full fixed-size buffers
with the counts travelling in them, build the send order on the device into those slots,
and run the experts with a strategy that needs no host counts (the "fixed" path, or a
padded batched GEMM over the capacity); the price is link bytes for the unused capacity.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any, Callable, NamedTuple

import numpy as np

from .._arrays import cupy_module, is_cupy
from .._compile import memoize_per_device, raw_module
from ..experts import no_mark, run_experts
from ..zero_experts import combine

EXCHANGE_KERNELS = ["ep_need", "ep_pack", "ep_combine_slots"]


@memoize_per_device
def _exchange_module():
    return raw_module("exchange.cu", EXCHANGE_KERNELS)


class ExchangeStats(NamedTuple):
    """What one forward moved. Rows and bytes over links count other ranks only; ``rows_local``
    is the rank's own tokens served by its own experts (a device copy)."""

    rows_sent: int            # (token, destination rank) pairs with a real expert there
    rows_received: int
    rows_local: int
    dispatch_bytes_sent: int
    dispatch_bytes_received: int
    combine_bytes_sent: int
    combine_bytes_received: int

    @property
    def bytes_sent(self) -> int:
        return self.dispatch_bytes_sent + self.combine_bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.dispatch_bytes_received + self.combine_bytes_received


class Dispatched(NamedTuple):
    """What ``dispatch`` returns: the rows this rank serves, and what ``combine`` needs."""

    x: Any            # [S_in, H] x's dtype: received token rows, grouped by source rank
    ids: Any          # [S_in, K] int32: local expert ids, -1 for slots on other ranks
    weights: Any      # [S_in, K] float32
    handle: Any       # (send order, send splits, receive splits), for combine


def config_fingerprint(config) -> np.ndarray:
    """int64 [F]: one number per MoEConfig field (``dataclasses.fields`` order), the value
    itself for an int field, else a CRC32 of its JSON. Equal configs give equal rows."""
    out = []
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        else:
            out.append(zlib.crc32(json.dumps(v, sort_keys=True).encode()))
    return np.array(out, np.int64)


class Exchange:
    """DeepEP-style buffer object of one rank: ``dispatch`` then ``combine`` per forward.

    ``num_experts``: E, the real experts of the whole layer (divisible by the group size).
    ``config``: the rank layer's MoEConfig, or None. When given, every dispatch sends its
    fingerprint (``config_fingerprint``) with the counts, and a rank whose config differs
    from another's raises ValueError naming the fields, before any row moves.
    ``last_stats`` holds the ExchangeStats of the latest forward.
    """

    def __init__(self, group, num_experts: int, config=None):
        R = group.world_size
        if num_experts % R:
            raise ValueError(f"num_experts: expected a multiple of the group size {R}, "
                             f"got {num_experts}")
        self.group = group
        self.num_experts = num_experts
        self.local_experts = num_experts // R
        self.config = config
        self._fingerprint = None if config is None else config_fingerprint(config)
        self._fingerprint_rows = None  # [R, 1 + F]: counts, then the fingerprint; on first use
        self.last_stats: ExchangeStats | None = None

    def _with_fingerprint(self, xp, send_counts):
        """The counts [R] as [R, 1 + F]: each row followed by this rank's config fingerprint
        (F int64 more per peer and forward; the device copy is made once)."""
        if self._fingerprint is None:
            return send_counts
        if self._fingerprint_rows is None or not isinstance(self._fingerprint_rows, xp.ndarray):
            R = self.group.world_size
            rows = np.zeros((R, 1 + self._fingerprint.size), np.int64)
            rows[:, 1:] = self._fingerprint
            self._fingerprint_rows = xp.asarray(rows)
        # One buffer for every call: each call's exchange reads it before the next call's
        # write, in stream order (NCCL) or before returning (local groups).
        self._fingerprint_rows[:, 0] = send_counts
        return self._fingerprint_rows

    def _check_fingerprints(self, received) -> None:
        """``received`` [R, F]: every rank's fingerprint. ValueError naming the fields that
        differ from this rank's, with the first rank where each differs."""
        mine = self._fingerprint
        differs = received != mine[None, :]
        if not differs.any():
            return
        fields = [f.name for f in dataclasses.fields(self.config)]
        parts = []
        for i in np.nonzero(differs.any(axis=0))[0]:
            p = int(np.nonzero(differs[:, i])[0][0])
            value = getattr(self.config, fields[i])
            other = (int(received[p, i]) if isinstance(value, int) and not isinstance(value, bool)
                     else "another value")
            parts.append(f"{fields[i]} {value!r} here, {other} on rank {p}")
        raise ValueError(f"config: the rank layers of one group must share one MoEConfig; rank "
                         f"{self.group.rank}'s differs: {'; '.join(parts)}")

    def dispatch(self, x, topk_ids, topk_weights) -> Dispatched:
        """Send each token once to every rank holding one of its real experts (collective;
        one host synchronization for the sizes). x [T, H]; ids, weights [T, K]."""
        if is_cupy(x):
            return self._dispatch_gpu(x, topk_ids, topk_weights)
        g, R, El = self.group, self.group.world_size, self.local_experts
        xp = np
        T, K = topk_ids.shape
        ids = topk_ids.astype(np.int32, copy=False)
        dest = xp.where(ids < self.num_experts, ids // El, -1)  # rank of each slot; -1: zero
        # need[p, t]: token t has a slot on rank p (rank-major, so rows group by destination)
        need = (dest[None, :, :] == xp.arange(R, dtype=np.int32)[:, None, None]).any(axis=2)
        send_counts = need.sum(axis=1)
        sent, received = g.exchange_counts(self._with_fingerprint(xp, send_counts))
        if self._fingerprint is not None:
            self._check_fingerprints(received[:, 1:])
        send_splits, recv_splits = sent[:, 0], received[:, 0]
        S, S_in = int(send_splits.sum()), int(recv_splits.sum())
        # Row order: every needed (p, t) in rank-major order, placed by a prefix sum; the
        # others write to a spare last slot (no host synchronization).
        flat = need.reshape(-1)
        pos = xp.where(flat, xp.cumsum(flat) - 1, S)
        order = xp.empty(S + 1, np.int64)
        order[pos] = xp.arange(R * T, dtype=np.int64)
        order = order[:S]
        tok, to = order % max(T, 1), order // max(T, 1)
        send_x = xp.ascontiguousarray(x[tok])
        row_ids = ids[tok]
        send_ids = xp.where(dest[tok] == to[:, None], row_ids - (to * El)[:, None].astype(
            np.int32), -1).astype(np.int32)
        send_w = xp.ascontiguousarray(topk_weights[tok], dtype=np.float32)
        recv_x = xp.empty((S_in, x.shape[1]), x.dtype)
        recv_ids = xp.empty((S_in, K), np.int32)
        recv_w = xp.empty((S_in, K), np.float32)
        g.all_to_all([send_x, xp.ascontiguousarray(send_ids), send_w], send_splits,
                      [recv_x, recv_ids, recv_w], recv_splits)
        self._record(x, K, send_splits, recv_splits)
        return Dispatched(recv_x, recv_ids, recv_w, (tok, to, send_splits, recv_splits, None,
                                                     None))

    def _dispatch_gpu(self, x, topk_ids, topk_weights) -> Dispatched:
        """dispatch on CuPy arrays: the same rows in the same order, the bookkeeping in the
        kernels of kernels/exchange.cu (a few launches, where the array operations of the
        NumPy version cost about a millisecond of host time per call)."""
        cp = cupy_module()
        g, R, El, E = self.group, self.group.world_size, self.local_experts, self.num_experts
        mod = _exchange_module()
        T, K = topk_ids.shape
        x = cp.ascontiguousarray(x)
        ids = cp.ascontiguousarray(topk_ids, dtype=np.int32)
        w = cp.ascontiguousarray(topk_weights, dtype=np.float32)
        need = cp.empty((R, T), np.int32)
        counts = cp.zeros(R, np.int32)
        args = (np.int32(T), np.int32(K), np.int32(E), np.int32(El))
        if T:
            mod.get_function("ep_need")((-(-T // 256),), (256,),
                                        (ids, *args[:4], np.int32(R), need, counts))
        sent, received = g.exchange_counts(self._with_fingerprint(cp, counts))
        if self._fingerprint is not None:
            self._check_fingerprints(received[:, 1:])
        send_splits, recv_splits = sent[:, 0], received[:, 0]
        S, S_in = int(send_splits.sum()), int(recv_splits.sum())
        pos = cp.cumsum(need.ravel(), dtype=np.int32)  # row of a needed (p, t): pos - 1
        H = x.shape[1]
        send_x = cp.empty((S, H), x.dtype)
        send_ids = cp.empty((S, K), np.int32)
        send_w = cp.empty((S, K), np.float32)
        tok = cp.empty(S, np.int64)
        to = cp.empty(S, np.int64)
        if S:
            row_bytes = H * x.itemsize
            vec16 = int(row_bytes % 16 == 0 and x.data.ptr % 16 == 0 and send_x.data.ptr % 16 == 0)
            mod.get_function("ep_pack")(
                (R * T,), (128,), (x, np.int64(row_bytes), np.int32(vec16), ids, w, need, pos,
                                   *args, send_x, send_ids, send_w, tok, to))
        recv_x = cp.empty((S_in, H), x.dtype)
        recv_ids = cp.empty((S_in, K), np.int32)
        recv_w = cp.empty((S_in, K), np.float32)
        g.all_to_all([send_x, send_ids, send_w], send_splits, [recv_x, recv_ids, recv_w],
                     recv_splits)
        self._record(x, K, send_splits, recv_splits)
        return Dispatched(recv_x, recv_ids, recv_w, (tok, to, send_splits, recv_splits, need,
                                                     pos))

    def _record(self, x, K, send_splits, recv_splits) -> None:
        """last_stats of a dispatch: rows and bytes to and from other ranks."""
        me = self.group.rank
        S, S_in = int(send_splits.sum()), int(recv_splits.sum())
        row_bytes = x.shape[1] * x.itemsize + K * 8
        out_rows, in_rows = S - int(send_splits[me]), S_in - int(recv_splits[me])
        self.last_stats = ExchangeStats(out_rows, in_rows, int(send_splits[me]),
                                        out_rows * row_bytes, in_rows * row_bytes, 0, 0)

    def combine(self, rows, handle):
        """Send each served row back to its home rank (collective). ``rows`` [S_in, H]: one per
        row ``dispatch`` received, in its order. Returns [S, H]: one row per (token,
        destination rank) this rank sent, in dispatch's send order (``handle``)."""
        g = self.group
        send_splits, recv_splits = handle[2], handle[3]
        xp = cupy_module() if is_cupy(rows) else np
        back = xp.empty((int(send_splits.sum()), rows.shape[1]), rows.dtype)
        g.all_to_all([xp.ascontiguousarray(rows)], recv_splits, [back], send_splits)
        row_bytes = rows.shape[1] * rows.itemsize
        st = self.last_stats
        self.last_stats = st._replace(combine_bytes_sent=st.rows_received * row_bytes,
                                      combine_bytes_received=st.rows_sent * row_bytes)
        return back


def ep_forward(layer, x, routing, mark: Callable[[str], None] | None = None):
    """y [T, H] of a rank layer (``layer.group`` set) for its tokens x and their routing over
    all E+Z experts. Collective: every rank calls it the same number of times.
    ``mark(stage)``, if given, is called after "dispatch", "experts" and "combine"."""
    mark = mark or no_mark
    cfg = layer.config
    ex = layer._exchange
    ids, weights = routing.topk_ids, routing.topk_weights
    T, K = ids.shape
    xp = layer.xp
    E = cfg.num_experts
    if E == 0:  # nothing to exchange: every slot is a zero expert
        return combine(x, ids, weights, 0, cfg.zero_types, None, layer.const_vec,
                       layer.const_gate, num_zero_experts=cfg.num_zero_experts, check_ids=False)
    d = ex.dispatch(x, ids, weights)
    mark("dispatch")
    S_in = d.x.shape[0]
    # float16: the partial sums stay fp32 (combine returns x's dtype, so it gets fp32 rows of
    # x; these rows hold no zero-expert slot, so x's values only set the output dtype).
    wide = x.dtype == np.float16
    scales = None if layer.w13_scale_inv is None else (layer.w13_scale_inv, layer.w2_scale_inv)
    partial = xp.empty((S_in, x.shape[1]), np.float32 if wide else x.dtype)
    step = layer.max_chunk_tokens  # bounds the expert stage's workspace per pass
    for s in range(0, S_in, step):
        sl = slice(s, min(S_in, s + step))
        out = run_experts(d.x[sl], d.ids[sl], layer.w13, layer.w2, None,
                          strategy=layer.expert_strategy, scales=scales)
        xs = d.x[sl].astype(np.float32) if wide else d.x[sl]
        partial[sl] = combine(xs, d.ids[sl], d.weights[sl], ex.local_experts, "identity",
                              out, num_zero_experts=0, check_ids=False)
    mark("experts")
    back = ex.combine(partial, d.handle)
    tok, to, need, pos = d.handle[0], d.handle[1], d.handle[4], d.handle[5]
    R = layer.group.world_size
    # One combine over K + R slots: the zero experts' slots as routed (real ones masked to -1,
    # which contributes nothing) and one slot per rank with weight 1 reading the row it sent
    # back (slot_rows -1 where the token had nothing there).
    if need is not None:  # CuPy: one kernel (kernels/exchange.cu ep_combine_slots)
        all_ids = xp.empty((T, K + R), np.int32)
        all_w = xp.empty((T, K + R), np.float32)
        slot_rows = xp.empty((T, K + R), np.int32)
        if T:
            _exchange_module().get_function("ep_combine_slots")(
                (-(-T * (K + R) // 256),), (256,),
                (xp.ascontiguousarray(ids, dtype=np.int32),
                 xp.ascontiguousarray(weights, dtype=np.float32), need, pos, np.int32(T),
                 np.int32(K), np.int32(E), np.int32(R), all_ids, all_w, slot_rows))
    else:
        extra = xp.full((T, R), -1, np.int32)
        extra[tok, to] = xp.arange(back.shape[0], dtype=np.int32)
        all_ids = xp.concatenate([xp.where(ids < E, -1, ids).astype(np.int32),
                                  xp.zeros((T, R), np.int32)], axis=1)
        all_w = xp.concatenate([weights.astype(np.float32, copy=False),
                                xp.ones((T, R), np.float32)], axis=1)
        slot_rows = xp.concatenate([xp.full((T, K), -1, np.int32), extra], axis=1)
    y = combine(x, all_ids, all_w, E, cfg.zero_types, (back, slot_rows), layer.const_vec,
                layer.const_gate, num_zero_experts=cfg.num_zero_experts, check_ids=False)
    mark("combine")
    return y
