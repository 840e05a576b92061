"""The "capacity" path: every real expert gets a block of C rows, C fixed by T, K and E (not
by the counts), so both GEMMs are single cuBLAS batched calls over all E experts whose shapes
are known without the per-expert counts: no host synchronization, and capturable in a CUDA
graph (graphs.py and "auto" use it from CAPACITY_MIN_PAIRS pairs per expert). A pair that
finds its expert's block full (a routing more skewed than C allows) is spilled to the
"syncfree" path, whose rows follow the blocks in the same output: the result is the same,
only slower.

Built for many rows per expert, where nearly every expert is active anyway: the batch has E
entries whatever the routing; those of inactive experts all read one expert's weights (mostly
L2 hits) and write scratch rows. At LongCat-Flash shapes (bf16, H200,
benchmarks/expert_sweep.py) the two batched GEMMs and the SiLU pass read the weights at
97-102% of the copy rate for C = 8 to 48 and 91% at 64, where the syncfree GEMMs reach 80-91%.
"""
from __future__ import annotations

import math

import numpy as np

from .. import _cublas
from .._arrays import DTYPES, cupy_module, dtype_name
from . import syncfree
from ._common import ExpertOutput, experts_module, gather_rows, no_mark, rows_dtype, silu_mul

# Mean (token, slot) pairs per real expert (T*K/E, every slot counted) from which this path
# runs, in graphs and eagerly: 13, below which syncfree's stream kernel serves
# (syncfree.STREAM_PAIRS_PER_EXPERT); while C <= CAPACITY_MAX_ROWS, the range measured (above
# it the blocks' memory grows past the other paths' and the batched calls leave the
# bytes-bound regime). LongCat-Flash bf16, graph replay x the floor, capacity / stream kernel
# (one H200, one run, benchmarks/stream_tiles.py): 192 tokens (4.5 pairs per expert) 1.03 /
# 0.99; 256 (6) 1.05 / 1.01; 384 (9) 1.04 / 1.01; 512 (12) 1.05 / 1.02; 768 (18) 1.06 / 1.12;
# 1024 (24) 1.07 / 1.45. (The bound was 4 while the stream kernel waited on one step of loads
# at a time: its rate then differed between cards whose copy rates did not.) So 555 to 1742
# tokens. Under expert parallelism the -1 slots of other ranks count too: C is larger than
# the real pairs need (speed only; the rows stay right).
CAPACITY_MIN_PAIRS = 13
CAPACITY_MAX_ROWS = 64


def capacity_rows(T: int, K: int, E: int) -> int:
    """C, the rows of each expert's block: the mean pairs per expert if every slot were real,
    lam = T*K/E, plus 3 standard deviations of a balanced (Poisson) routing and 4, rounded up
    to a multiple of 8. Pairs beyond C are spilled, not lost."""
    lam = T * K / E
    return int(math.ceil((lam + 3 * math.sqrt(lam) + 4) / 8) * 8)


def prefers(T: int, K: int, E: int) -> bool:
    """Whether "auto" (and a CUDA graph) runs this path for T tokens (see CAPACITY_MIN_PAIRS)."""
    return E > 0 and T * K >= CAPACITY_MIN_PAIRS * E and capacity_rows(T, K, E) <= CAPACITY_MAX_ROWS


def capacity_ready(x, w13, w2) -> bool:
    """Whether this path serves these arrays: bf16 (fp16 would need fp32 output rows from the
    batched call, which cuBLAS may refuse, and a graph cannot fall back) with the 16-byte
    alignment of the tensor-core paths (the spill runs on syncfree)."""
    return dtype_name(x.dtype) == "bfloat16" and syncfree.tensor_core_ready(x, w13, w2)


def capacity(x, ids, w13, w2, allow_tf32, mark):
    """expert_mlp's GPU contract (rows + slot_rows), no host synchronization. Where
    capacity_ready is false (or E = 0), the syncfree path runs instead."""
    if not capacity_ready(x, w13, w2) or w13.shape[0] == 0:
        return syncfree.syncfree(x, ids, w13, w2, None, mark)
    cp = cupy_module()
    T, H = x.shape
    E, I2 = w13.shape[0], w13.shape[1]
    I = I2 // 2
    K = ids.shape[1]
    P = T * K
    C = capacity_rows(T, K, E)
    name = dtype_name(x.dtype)
    ctype = DTYPES[name][1]
    mod = experts_module()
    offsets = cp.arange(0, E * C + 1, C, dtype=np.int32)  # expert e's block: rows e*C ...
    cursor = cp.zeros(E, np.int32)
    spill = cp.empty((T, K), np.int32)
    # Row buffers: E blocks of C rows and a scratch block E (the inactive entries' rows).
    slot_rows, xs = gather_rows(mod, ctype, x, ids, offsets, cursor, E, (E + 1) * C, C, spill)
    gate_up = cp.empty(((E + 1) * C, I2), x.dtype)
    h = cp.empty(((E + 1) * C, I), x.dtype)
    # the blocks' rows, then the spilled pairs' rows (at most P), then scratch
    rows = cp.empty((E * C + P + C, H), rows_dtype(x.dtype))
    # Batch entries: the active experts (cursor: the claims on each block), then the inactive
    # ones, which all read expert 0's weights (capacity_pointers in kernels/experts.cu).
    # Measured (H200, LongCat-Flash, C = 16, 440 of 512 experts active): 8.37 ms against 9.03
    # with every entry reading its own expert and 7.76 over the active experts alone.
    active = cp.empty(E + 1, np.int32)
    syncfree.syncfree_module().get_function("syncfree_plan")(
        (1,), (1024,), (cursor, np.int32(E), cp.empty(E + 1, np.int32),
                        cp.empty(E, np.int32), active))
    ptrs = cp.empty((6, E), np.uint64)
    u64 = np.uint64
    mod.get_function("capacity_pointers")(
        (-(-E // 256),), (256,),
        (active, np.int32(E), np.int32(C), u64(w13.data.ptr), u64(w13.strides[0]),
         u64(xs.data.ptr), u64(xs.strides[0]), u64(gate_up.data.ptr), u64(gate_up.strides[0]),
         u64(w2.data.ptr), u64(w2.strides[0]), u64(h.data.ptr), u64(h.strides[0]),
         u64(rows.data.ptr), u64(rows.strides[0]), u64(rows.data.ptr + (E * C + P) *
                                                       rows.strides[0]), ptrs))
    mark("permute")
    _cublas.batched_gemm_nt(ptrs[0], ptrs[1], ptrs[2], C, I2, H, name, allow_tf32)
    mark("gemm1")
    silu_mul(mod, ctype, gate_up, h, E * C, I)
    mark("activation")
    _cublas.batched_gemm_nt(ptrs[3], ptrs[4], ptrs[5], C, H, I, name, allow_tf32)
    # Spilled pairs: the syncfree path over them alone (no pair at all in a balanced routing:
    # its kernels find no active expert and exit).
    spilled = syncfree.syncfree(x, spill, w13, w2, None, no_mark,
                                out_rows=rows[E * C:E * C + P])
    slot_rows = cp.where(slot_rows >= 0, slot_rows,
                         cp.where(spilled.slot_rows >= 0, spilled.slot_rows + E * C, -1))
    mark("gemm2")
    return ExpertOutput(rows, slot_rows.astype(np.int32, copy=False))

