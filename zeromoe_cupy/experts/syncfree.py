"""The "syncfree" path: the experts with the per-expert row counts left on the device, so the
pass makes no host synchronization and can be captured in a CUDA graph (graphs.py).

Device scan of the counts -> offsets and the list of active experts (kernels/syncfree.cu
syncfree_plan) -> gather (rows in expert order) -> GEMM 1 fused with SiLU * up -> GEMM 2. Each
GEMM runs on a fixed grid of (feature chunk, active-expert slot) blocks sized for the worst
case (min(E, T*K) active experts); blocks past the active count exit at once, on the tensor
cores (bf16/fp16 in, fp32 accumulate): built for the memory-bound regime of few rows per
expert (decode, up to a few thousand tokens). With few (token, slot) pairs per expert
(STREAM_PAIRS_PER_EXPERT) syncfree_stream: each warp streams 16 weight rows from global memory
(no shared memory, no block synchronization) with the expert's rows 16 at a time; above,
syncfree_gemm: each block streams its slice of one expert's weights through shared memory
once per SYNCFREE_ROWS rows of that expert. fp32 layers, and sizes the 16-byte loads
cannot serve (H or I not a multiple of 8, misaligned weights), take the "fixed" path, which
is also free of host synchronization.
"""
from __future__ import annotations

import numpy as np

from .._arrays import DTYPES, cupy_module, dtype_name
from .._compile import memoize_per_device, optin_shared_bytes, raw_module
from . import fixed
from ._common import (ExpertOutput, experts_module, gather_rows, half_rows_scaled, out_ctype,
                      real_counts, rows_dtype)

SYNCFREE_ROWS = 32  # kernels/syncfree.cu SF_MT: rows per pass over an expert's weights
# syncfree_stream (weights streamed from global memory, the expert's rows 16 per pass) under 13
# (token, slot) pairs per expert, P / E, as (bound, 8-row tiles per pass); syncfree_gemm from
# there. H200, LongCat-Flash bf16 (E = 512), graph replay x the floor with syncfree_gemm /
# syncfree_stream of 2 tiles / 4 tiles / 8 tiles (one run, benchmarks/stream_tiles.py): 192
# tokens (P / E = 4.5) 1.15 / 0.99 / 0.99 / 1.39; 384 (9) 1.19 / 1.01 / 1.03 / 1.53; 512 (12)
# 1.31 / 1.02 / 1.04 / 1.57; 1024 (24) 1.27 / 1.45 / 1.11 / 1.79. The bound: where the
# capacity path takes over (capacity.py).
STREAM_PAIRS_PER_EXPERT = ((13, 2),)
STREAM_TILES = (2,)  # the tile counts compiled (STREAM_PAIRS_PER_EXPERT picks among them)
_STREAM_FEATURES = 16 * 4  # kernels/syncfree.cu: 16 features per warp, SF_STREAM_WARPS
_BLOCK_FEATURES = {True: 64, False: 128}  # output features per block: GLU / plain
_BLOCK_ROWS = 128 + SYNCFREE_ROWS  # weight rows + expert rows of one pipeline stage
# The pipeline of kernels/syncfree.cu (its -D options): reduction elements per stage, stages,
# blocks per SM budgeted, L2 prefetch bytes of the weight loads. Chosen by
# benchmarks/expert_sweep.py (H200, LongCat-Flash bf16, T = 64 to 1024): 80-91% of the copy
# rate, where (32, 3, 3, no prefetch) read at 56-59%; the 256-byte L2 prefetch alone gave 73-80%.
# SMALL_PIPELINE: GPUs whose blocks cannot opt in to PIPELINE's 69 KB of shared memory.
PIPELINE = (("SF_BK", 64), ("SF_STAGES", 3), ("SF_MIN_BLOCKS", 3), ("SF_PREFETCH", 256))
SMALL_PIPELINE = (("SF_BK", 32), ("SF_STAGES", 3), ("SF_MIN_BLOCKS", 3), ("SF_PREFETCH", 256))


def _gemm_names() -> list[str]:
    names = []
    for name in ("bfloat16", "float16"):
        ctype = DTYPES[name][1]
        names += [f"syncfree_gemm<{ctype},{out_ctype(ctype)},{str(glu).lower()}>"
                  for glu in (True, False)]
    return names


def stream_tiles(pairs: int, experts: int) -> int:
    """8-row tiles per pass of syncfree_stream for ``pairs`` (token, slot) pairs over
    ``experts`` real experts (STREAM_PAIRS_PER_EXPERT), or 0 where syncfree_gemm serves."""
    return next((n for bound, n in STREAM_PAIRS_PER_EXPERT if pairs < bound * experts), 0)


def _stream_names() -> list[str]:
    names = []
    for name in ("bfloat16", "float16"):
        ctype = DTYPES[name][1]
        names += [f"syncfree_stream<{ctype},{out_ctype(ctype)},{str(glu).lower()},{nt}>"
                  for glu in (True, False) for nt in STREAM_TILES]
    return names


def syncfree_kernel_names() -> list[str]:
    """Every instantiation in kernels/syncfree.cu that the path (and graphs.py) may launch."""
    return ["syncfree_plan", "mask_padding_rows"] + _gemm_names() + _stream_names()


def syncfree_smem_bytes(pipeline=PIPELINE) -> int:
    """Dynamic shared memory of syncfree_gemm: its stages, or the fp32 result tile it reuses
    them for, whichever is larger (kernels/syncfree.cu)."""
    p = dict(pipeline)
    stages = p["SF_STAGES"] * _BLOCK_ROWS * (p["SF_BK"] + 8) * 2
    return max(stages, SYNCFREE_ROWS * (128 + 4) * 4)


def syncfree_module(pipeline=None):
    """kernels/syncfree.cu built for ``pipeline`` ((name, value) pairs, as PIPELINE; None: the
    device's, device_pipeline)."""
    return _syncfree_module(pipeline or device_pipeline())


@memoize_per_device
def _syncfree_module(pipeline):
    return raw_module("syncfree.cu", syncfree_kernel_names(),
                      tuple(f"-D{k}={v}" for k, v in pipeline),
                      dynamic_smem=(syncfree_smem_bytes(pipeline), _gemm_names()))


def tensor_core_ready(x, w13, w2) -> bool:
    """Whether the tensor-core kernels serve these arrays (else the "fixed" path runs)."""
    H, I = x.shape[1], w2.shape[2]
    return (dtype_name(x.dtype) in ("bfloat16", "float16") and H % 8 == 0 and I % 8 == 0
            and w13.data.ptr % 16 == 0 and w2.data.ptr % 16 == 0)


@memoize_per_device
def device_pipeline():
    """PIPELINE where the current GPU's blocks can have its shared memory, else SMALL_PIPELINE."""
    return PIPELINE if syncfree_smem_bytes(PIPELINE) <= optin_shared_bytes() else SMALL_PIPELINE


def syncfree(x, ids, w13, w2, expert_counts, mark, pipeline=None, out_rows=None):
    """expert_mlp's GPU contract (rows in expert order + slot_rows) without host syncs.
    ``out_rows``: None, or a C-contiguous (>= T*K, H) array of rows_dtype(x.dtype) to write the
    rows into (only where tensor_core_ready; the capacity path's spill)."""
    if not tensor_core_ready(x, w13, w2):
        return fixed.fixed(x, ids, w13, w2, expert_counts, mark)
    cp = cupy_module()
    T, H = x.shape
    E, I2 = w13.shape[0], w13.shape[1]
    I = I2 // 2
    K = ids.shape[1]
    P = T * K
    ctype = DTYPES[dtype_name(x.dtype)][1]
    pipeline = pipeline or device_pipeline()
    mod = _syncfree_module(pipeline)
    smem = syncfree_smem_bytes(pipeline)
    counts = real_counts(ids, expert_counts, E)
    offsets = cp.empty(E + 1, np.int32)
    cursor = cp.empty(E, np.int32)
    active = cp.empty(E + 1, np.int32)
    mod.get_function("syncfree_plan")((1,), (1024,), (counts, np.int32(E), offsets, cursor,
                                                      active))
    # P rows bound the real pairs: rows past offsets[E] stay unwritten and nothing reads them.
    slot_rows, xs = gather_rows(experts_module(), ctype, x, ids, offsets, cursor, E, P)
    # fp16: GEMM 1 writes the activation in fp32, stored in fp16 for GEMM 2 with a per-row
    # power-of-two scale where it passes 65504, which GEMM 2 undoes on its fp32 output rows
    # (rows_dtype): no fp16 intermediate overflows where y fits.
    half = ctype == "__half"
    act = cp.empty((P, I), rows_dtype(x.dtype))
    h = cp.empty((P, I), x.dtype) if half else act
    rows = cp.empty((P, H), rows_dtype(x.dtype)) if out_rows is None else out_rows
    o = out_ctype(ctype)
    mark("permute")
    slots = min(E, P)
    row_scale = None
    if slots:
        nt = stream_tiles(P, E)
        for glu, src, W, N, Kd, out in ((True, xs, w13, I, H, act), (False, h, w2, H, I, rows)):
            args = (src, W, out, offsets, active, np.int32(N), np.int32(Kd),
                    row_scale if row_scale is not None else 0)
            if nt:
                mod.get_function(f"syncfree_stream<{ctype},{o},{str(glu).lower()},{nt}>")(
                    (-(-N // _STREAM_FEATURES), slots), (128,), args)
            else:
                mod.get_function(f"syncfree_gemm<{ctype},{o},{str(glu).lower()}>")(
                    (-(-N // _BLOCK_FEATURES[glu]), slots), (256,), args, shared_mem=smem)
            if glu:
                mark("gemm1")
                if half:
                    row_scale = half_rows_scaled(experts_module(), act, h, P, I)
                mark("activation")  # fused into GEMM 1 (fp16: and the scaled copy)
    else:
        for stage in ("gemm1", "activation"):
            mark(stage)
    mark("gemm2")
    return ExpertOutput(rows, slot_rows)
