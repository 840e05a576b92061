"""FP8 experts on the GPU (docs/spec.md "FP8 experts"): e4m3 weights (uint8 bits) with fp32 block
scales, activations quantized per row and 128 features.

- Few pairs (T*K up to _common.pairs_max), and the deterministic mode: x quantized per row by
  a small kernel, then the pair kernel reads the weight bytes and their scales straight from
  the routing ids; h (fp32) is quantized the same way between the passes. No host
  synchronization; a token's result does not depend on its batch. The kernel: pair_mma_fp8
  (kernels/fp8.cu; e4m3 tensor cores, compute capability >= 8.9, reduction sizes multiples of
  16), else pair_gemv_fp8 (fp32 FMAs).
- Moderate (T*K <= GROUPED_MMA_MAX, GROUPED_MAX for grouped_gemv_fp8, any T*K where
  grouped_wgmma_fp8 can serve, even below its WGMMA_PAIRS_PER_EXPERT, or where the tensor-core
  kernels serve and cuBLASLt may not (_lt_may_serve); strategy "grouped", or
  "syncfree" as graphs ask): rows placed by expert (device offsets and the active
  experts from syncfree_plan, no host synchronization), x's rows quantized straight into
  their places (quantize_pairs: no gathered copy of x; grouped_gemv_fp8 below reads a
  gathered copy), then per GEMM a fixed grid of (feature chunk, active expert) blocks on the
  tensor cores (H and I multiples of 16, compute capability >= 8.0):
  - up to STREAM_PAIRS_PER_EXPERT pairs per expert on average (compute capability >= 8.9):
    grouped_stream_fp8, each warp streaming 16 weight rows from global memory into mma.sync
    with the expert's rows, 8 (or 16) per pass, as the other operand;
  - above: grouped_mma_fp8, the weights staged through shared memory once per 64 of the
    expert's rows (e4m3 operands from compute capability 8.9, else converted to fp16).
  - from WGMMA_PAIRS_PER_EXPERT pairs per expert on average (compute capability 9.0, I >=
    WGMMA_MIN_INTERMEDIATE, any number of pairs: "auto" takes this path instead of the padded
    one): grouped_wgmma_fp8 (kernels/fp8_wgmma.cu), Hopper's warpgroup FP8 tensor cores over
    64-row x 128-feature tiles (with few rows per expert, WGMMA_ROWS_N: 16 or 32 rows as the
    wgmma's N, the 128 weight rows as its M), a persistent grid over (expert, feature chunk,
    row tile) items, a producer warpgroup copying the stages. The FP8 wgmma does
    not sum in exact fp32: its partial sums are promoted every 32 k's in GEMM 1, whose error
    h's quantization amplifies, and every 128 in GEMM 2. H200, LongCat-Flash: the layer's
    output 2.1e-3 from the exact kernels' (promoted every 128 in both: 2.7e-3, and then within
    1.1e-4 of the padded path's cuBLASLt block-scaled GEMM).
  Otherwise grouped_gemv_fp8, fp32 FMAs over the expert's rows a few at a time.
- More (strategy "padded"): the padded layout (experts/_common.gather), the activations
  quantized by a small kernel, and one cuBLASLt block-scaled FP8 GEMM per active expert and
  GEMM (FP8 tensor cores; H and I multiples of 128, compute capability >= 8.9; on 9.x only
  with LT_INEXACT_SUMS, for the reason given there). Where that is not available, or
  cuBLASLt refuses, the same layout with each expert's weights and the quantized activations
  (a' = q * sa) dequantized to fp32, through fp32 cuBLAS GEMMs (exact products; slow).
  Before its first use at a layer shape (H, I), the GEMM runs once at that shape on random
  operands against their product (_lt_self_check): cuBLASLt serves only shapes where that
  check passed. ``LT_REFUSAL`` keeps why cuBLASLt is not used at all (None while it is);
  ``LT_REFUSED`` maps (x's dtype, H, I) of layers whose GEMMs cuBLASLt refused or got wrong
  to the reason (measured on the H200: the heuristic offers an algorithm for K = 128 or 256
  that cublasLtMatmul then refuses with NOT_SUPPORTED; LongCat-Flash's shapes run).
"""
from __future__ import annotations

import numpy as np

from .. import _cublas, quant
from .._arrays import DTYPES, cupy_module, dtype_name, with_unit_row_layout
from .._compile import memoize_per_device
from ._common import (MAX_TILE, PAD_ROWS, PAIR_ROWS, PAIR_WARPS, ExpertOutput, experts_module,
                      gather, gather_rows, out_ctype, pairs_max, real_counts, rows_dtype,
                      tile_plan)

GROUPED_MAX = 4096  # "auto": (token, slot) pairs up to which grouped_gemv_fp8 runs
# ... and the tensor-core grouped kernels: 4096 tokens of top-12. The padded path pays one
# cuBLASLt call, tens of microseconds, per active expert and GEMM: LongCat-Flash on the H200,
# grouped / padded ms at 512 / 1024 / 2048 / 4096 tokens: 7.1 / 9.2 / 11.8 / 19.9 against
# 30.1 / 32.4 / 31.6 / 29.3 (at 16384 padded takes 30.5).
GROUPED_MMA_MAX = 12 * 4096
GROUPED_MMA = True  # the tensor-core grouped kernels where they serve (else grouped_gemv_fp8)
# grouped_mma_fp8's operands: the e4m3 bytes as they are (mma.sync m16n8k32) from compute
# capability 8.9 on, else converted to fp16 (m16n8k16). Same bits (H200).
GROUPED_E4M3 = True
# grouped_stream_fp8 (compute capability >= 8.9) by (token, slot) pairs per expert, P / E:
# (most, 8-row tiles per pass). LongCat-Flash on the H200 (E = 512; eager ms, grouped_mma_fp8 /
# stream with 1 tile / 2 tiles): 128 tokens (P / E = 3) 6.50 / 4.47 / 4.87; 256 (6) 7.50 /
# 5.39 / 5.79; 512 (12) 7.93 / 7.85 / 7.35; 1024 (24) 9.21 / 13.1 / 11.5. Same bits.
STREAM_PAIRS_PER_EXPERT = ((8, 1), (16, 2))
# grouped_wgmma_fp8 (kernels/fp8_wgmma.cu; compute capability 9.0) from this many (token,
# slot) pairs per expert on average, P / E, instead of the kernels above; "auto" then never
# takes the padded path. LongCat-Flash fp8 on the H200, eager ms, wgmma / before (the stream
# kernel, grouped_mma_fp8, the padded path from 4096 tokens on): 256 tokens (P / E = 6) 6.01 /
# 5.56; 512 (12) 6.66 / 7.77; 1024 6.47 / 9.63; 2048 7.08 / 12.70; 4096 11.13 / 20.27; 16384
# 31.79 / 34.37 (benchmarks/fp8_prefill.py). With 16 rows as the wgmma's N (WGMMA_ROWS_N),
# later: 256 tokens 4.66 against the stream kernel's 4.73 (same run): too close to move this.
GROUPED_WGMMA = True
WGMMA_PAIRS_PER_EXPERT = 12
# ... and only from this intermediate size on. The FP8 wgmma's sums are not exact fp32, and
# gate/up errors move h's e4m3 quantization by whole steps: with I of 128-144 (GPU tests, H of
# 200-256) the layer's output landed 2e-3 to 7.1e-3 from the float64 evaluation of SPEC's math
# (two of about 80 cases past its 5e-3 bound); with many features the moved steps average out
# (LongCat-Flash, I = 2048: 2.1e-3 from the exact kernels, which are 1.9e-3 from it). Below,
# the exact mma.sync kernels serve. cuBLASLt's block-scaled GEMM sums the same way, with
# 128-k partials in both GEMMs: see LT_INEXACT_SUMS.
WGMMA_MIN_INTERMEDIATE = 1024
WGMMA_PIPELINE = quant.WGMMA_PIPELINE  # its pipeline (quant.py)
# ... with tiles of ROWS_N expert rows as wgmma's N (kernels/fp8_wgmma.cu) up to this many pairs
# per expert on average, P / E: (most, ROWS_N); above, 64-row tiles as wgmma's M. With few rows
# per expert the 64-row tiles spend most of their tensor-core work, and their waits for each
# 32-k partial, on rows that are not there. LongCat-Flash fp8 on the H200, eager ms, 64-row
# tiles / 32 / 16 rows as N (benchmarks/fp8_prefill.py, one run; same output bits): 256 tokens
# (P / E = 6) 4.93 / 4.76 / 4.66; 512 (12) 5.32 / 5.07 / 5.00; 1024 (24) 5.52 / 5.36 / 5.58;
# 2048 (48) 5.89 / 7.84 / 8.52; 4096 9.51 / 11.40 / 14.63 (64 rows as N: slower than all).
WGMMA_ROWS_N = ((12, 16), (32, 32))
# pair_mma_fp8 where it serves (else pair_gemv_fp8), and the warps that share each of its
# tiles, by (token, slot) pairs (H200, graph replay ms at 1 / 2 / 4 tokens: one warp 0.159 /
# 0.244 / 0.376, two 0.149 / 0.233 / 0.397, four 0.150 / 0.240 / 0.395).
PAIR_MMA = True
PAIR_MMA_KSPLIT = ((24, 2), (None, 1))  # (most pairs, warps per tile); None: any number
_PM_FEATS = 16  # kernels/fp8.cu PM_FEATS: output features per warp of pair_mma_fp8
_MMA_FEATURES = {True: 64, False: 128}  # kernels/fp8.cu grouped_mma_fp8: features per block
LT_REFUSAL: str | None = None
LT_REFUSED: dict = {}
# cuBLASLt's block-scaled FP8 GEMM on compute capability 9.x runs on wgmma, whose sums keep
# fewer bits than fp32 within each 128-k scale group (cuBLASLt offers no shorter promotion;
# grouped_wgmma_fp8 promotes every 32 k's in GEMM 1 for this reason), and h's e4m3
# quantization amplifies GEMM 1's errors: bf16 layers through the padded path landed 2.3e-3
# to 5.07e-3 from the float64 evaluation (H = 256; I = 128 and 1024; H200, cuBLAS 13.1), past
# SPEC's 5e-3. So on 9.x the padded path runs its exact fp32 fallback, and "auto" the exact
# grouped kernels at any size, unless this is True (cuBLASLt's speed, its error).
LT_INEXACT_SUMS = False
_NULL = np.uint64(0)


def expert_mlp_fp8(x, topk_ids, w13, w2, scales, expert_counts, mark, strategy):
    cp = cupy_module()
    T, H = x.shape
    K = topk_ids.shape[1]
    ids = cp.ascontiguousarray(topk_ids, dtype=np.int32)
    x = with_unit_row_layout(x)
    w13, w2 = (cp.ascontiguousarray(w).view(np.uint8) for w in (w13, w2))
    s13, s2 = (cp.ascontiguousarray(s, dtype=np.float32) for s in scales)
    if strategy == "auto":
        I = w13.shape[1] // 2
        mma = _mma_ready(H, I, w13, w2)
        limit = (T * K if _wgmma_ready(H, I, w13, w2) or (mma and not _lt_may_serve(H, I))
                 else GROUPED_MMA_MAX if mma else GROUPED_MAX)
        most = pairs_max(dtype_name(x.dtype), "fp8")
        strategy = "pairs" if T * K <= most else "grouped" if T * K <= limit else "padded"
    if strategy in ("pairs", "fixed"):  # the pair kernel: a token's result is batch-invariant
        return pairs_fp8(x, ids, w13, s13, w2, s2, mark)
    if strategy in ("grouped", "syncfree", "capacity"):  # sync-free: graphs capture it
        return grouped_fp8(x, ids, w13, s13, w2, s2, expert_counts, mark)
    return gemm_fp8(x, ids, w13, s13, w2, s2, expert_counts, mark)


def grouped_fp8(x, ids, w13, s13, w2, s2, expert_counts, mark):
    """Rows by expert (no padding, device offsets), activations quantized per row and 128
    features (K-major scales), then grouped_wgmma_fp8, grouped_stream_fp8, grouped_mma_fp8 or
    grouped_gemv_fp8 (module docstring) for each GEMM. No
    host synchronization: buffers are sized for every (token, slot) pair."""
    cp = cupy_module()
    T, H = x.shape
    E, I = w13.shape[0], w13.shape[1] // 2
    P = T * ids.shape[1]
    ctype = DTYPES[dtype_name(x.dtype)][1]
    pipeline = quant.fp8_pipeline()
    qmod = quant.fp8_module(pipeline)
    counts = real_counts(ids, expert_counts, E)
    if _mma_ready(H, I, w13, w2):
        smem = quant.fp8_smem_bytes(pipeline)
        e4m3 = str(GROUPED_E4M3 and _e4m3_tensor_cores()).lower()
        from .syncfree import syncfree_module
        offsets = cp.empty(E + 1, np.int32)
        cursor = cp.empty(E, np.int32)
        active = cp.empty(E + 1, np.int32)
        syncfree_module().get_function("syncfree_plan")(
            (1,), (1024,), (counts, np.int32(E), offsets, cursor, active))
        # P rows bound the real pairs: rows past offsets[E] stay unwritten and nothing reads them.
        # No copy of x's rows: quantize_pairs reads them through slot_rows.
        slot_rows, xs = gather_rows(experts_module(), ctype, x, ids, offsets, cursor, E, P,
                                    copy=False)
        slots = min(E, P)

        nt = next((n for most, n in STREAM_PAIRS_PER_EXPERT if P <= most * E), 0) \
            if e4m3 == "true" else 0
        wgmma = P >= WGMMA_PAIRS_PER_EXPERT * E and _wgmma_ready(H, I, w13, w2)
        if wgmma:
            wmod = quant.fp8_wgmma_module(WGMMA_PIPELINE)
            rows_n = _wgmma_rows_n(P, E)
            tile_start = cp.empty(E + 1, np.int32)
            wmod.get_function("wgmma_tile_plan")(
                (1,), (1024,), (offsets, active, tile_start,
                                np.int32(rows_n or quant.wgmma_tile_rows(WGMMA_PIPELINE))))

        def gemm(glu, types, a, asc, W, S, N, Kd, out):
            if wgmma:  # a persistent grid: as many blocks as fit on the GPU at once
                kernel = wmod.get_function(
                    f"grouped_wgmma_fp8<{types},{str(glu).lower()},{rows_n}>")
                kernel((_resident_blocks(kernel, WGMMA_PIPELINE),),
                       (quant.wgmma_threads(WGMMA_PIPELINE),),
                       (a, asc, offsets, active, tile_start, W, S, np.int32(N), np.int32(Kd), out),
                       shared_mem=quant.wgmma_smem_bytes(WGMMA_PIPELINE))
                return
            if nt:
                qmod.get_function(f"grouped_stream_fp8<{types},{str(glu).lower()},{nt}>")(
                    (-(-N // (PAIR_WARPS * _PM_FEATS)), slots), (32 * PAIR_WARPS,),
                    (a, asc, offsets, active, W, S, np.int32(N), np.int32(Kd), out))
                return
            qmod.get_function(f"grouped_mma_fp8<{types},{str(glu).lower()},{e4m3}>")(
                (-(-N // _MMA_FEATURES[glu]), slots), (256,),
                (a, asc, offsets, active, W, S, np.int32(N), np.int32(Kd), out),
                shared_mem=smem)
    else:
        offsets, slot_rows, xs = gather(experts_module(), ctype, x, ids, counts, E, 1, P)
        slots = P

        def gemm(glu, types, a, asc, W, S, N, Kd, out):
            R = PAIR_ROWS[glu]
            vec = str(_vec16(Kd, W)).lower()
            qmod.get_function(f"grouped_gemv_fp8<{types},{R},{str(glu).lower()},{vec}>")(
                (-(-N // (PAIR_WARPS * R)), E), (32 * PAIR_WARPS,),
                (a, asc, offsets, W, S, np.int32(N), np.int32(Kd), out))
    hb, ib = quant.blocks(H), quant.blocks(I)
    xq = cp.empty((P, H), np.uint8)
    xsc = cp.empty((P, hb), np.float32)
    h = cp.empty((P, I), np.float32)  # fp32: h is quantized from fp32 (docs/spec.md)
    hq = cp.empty((P, I), np.uint8)
    hsc = cp.empty((P, ib), np.float32)
    rows = cp.empty((P, H), rows_dtype(x.dtype))  # fp16 layers: fp32 (rows_dtype)
    if slots and xs is None:  # x's rows through slot_rows
        pairs = ids.size
        qmod.get_function(f"quantize_pairs<{ctype}>")(
            _quantize_grid(pairs, H), (128,),
            (x, np.int64(x.strides[0] // x.itemsize), np.int32(ids.shape[1]), slot_rows,
             np.int64(pairs), np.int32(H), xq, xsc))
    elif slots:
        qmod.get_function(f"quantize_rows<{ctype}>")(
            _quantize_grid(P, H), (128,),
            (xs, np.int32(P), np.int32(H), offsets, np.int32(E), np.int32(0), xq, xsc, _NULL))
    mark("permute")
    for glu, a, asc, W, S, N, Kd, out, types in (
            (True, xq, xsc, w13, s13, I, H, h, f"{ctype},float"),
            (False, hq, hsc, w2, s2, H, I, rows, f"{ctype},{out_ctype(ctype)}")):
        if slots:
            if not glu:
                qmod.get_function("quantize_rows<float>")(
                    _quantize_grid(P, I), (128,),
                    (h, np.int32(P), np.int32(I), offsets, np.int32(E), np.int32(0), hq, hsc,
                     _NULL))
            gemm(glu, types, a, asc, W, S, N, Kd, out)
        mark("gemm1" if glu else "gemm2")
        if glu:
            mark("activation")  # fused into GEMM 1's pass (h's quantization runs before GEMM 2)
    return ExpertOutput(rows, slot_rows)


def _mma_ready(H, I, w13, w2) -> bool:
    """Whether grouped_mma_fp8 serves: 16-byte loads (H, I multiples of 16, aligned weights),
    and mma.sync / cp.async (compute capability >= 8.0)."""
    if not GROUPED_MMA or H % 16 or I % 16 or not _aligned16(w13, w2):
        return False
    return int(cupy_module().cuda.Device().compute_capability) >= 80


# quantize_rows' grid: one warp per (row, 128-feature group) up to this many blocks, else each
# warp over up to 8 groups of its row. A warp's groups run one after another, each waiting
# on its loads: at one token of LongCat-Flash fp8, x's 48 groups over 6 warps took 8.2 us
# (H200); one block per group removes the chain. At 16384 tokens one warp per group made 1.5
# million blocks, whose launch bounded the kernel (2.5 ms for 2.4 GB).
QUANTIZE_MAX_BLOCKS = 16384


def _quantize_grid(rows: int, K: int) -> tuple:
    """quantize_rows' grid (kernels/fp8.cu; also quantize_pairs'): 4 rows (or pairs) per
    block of 128 threads; y = K's 128-feature groups (one per warp) where that makes at most
    QUANTIZE_MAX_BLOCKS blocks, else fewer, down to each warp over up to 8 groups. Any y
    gives the same bytes."""
    x, groups = max(1, -(-rows // 4)), max(1, quant.blocks(K))
    return x, min(groups, max(-(-groups // 8), QUANTIZE_MAX_BLOCKS // x))


def _wgmma_ready(H, I, w13, w2) -> bool:
    """Whether grouped_wgmma_fp8 serves: compute capability 9.0 (its sm_90a code runs there
    only), I >= WGMMA_MIN_INTERMEDIATE and what grouped_mma_fp8 needs."""
    return GROUPED_WGMMA and I >= WGMMA_MIN_INTERMEDIATE and _mma_ready(H, I, w13, w2) and \
        cupy_module().cuda.Device().compute_capability == "90"


def _wgmma_rows_n(P: int, E: int) -> int:
    """grouped_wgmma_fp8's ROWS_N for P (token, slot) pairs over E experts (WGMMA_ROWS_N), 0 for
    64-row tiles; only sizes that WGMMA_PIPELINE builds."""
    sizes = quant.wgmma_rows_n_sizes(WGMMA_PIPELINE)
    return next((rows for most, rows in WGMMA_ROWS_N if P <= most * E and rows in sizes), 0)


def _resident_blocks(kernel, pipeline) -> int:
    """Blocks of grouped_wgmma_fp8 that the current GPU runs at once: per SM, as many as its
    registers, shared memory and threads allow."""
    sm_regs, sm_smem, sm_threads, sms = _sm_limits()
    threads, smem = quant.wgmma_threads(pipeline), quant.wgmma_smem_bytes(pipeline)
    regs = -(-kernel.num_regs * 32 // 256) * 256 * (threads // 32)  # allocated per warp
    per_sm = min(sm_regs // regs, sm_smem // (smem + 1024), sm_threads // threads)
    return max(1, per_sm) * sms


@memoize_per_device
def _sm_limits() -> tuple:
    """(registers, shared memory bytes, threads) per SM and the SM count of the current GPU,
    queried once per device (Device().attributes asks for every attribute at each call, and
    this runs twice per forward)."""
    rt = cupy_module().cuda.runtime
    device = rt.getDevice()
    return tuple(rt.deviceGetAttribute(a, device) for a in (
        rt.cudaDevAttrMaxRegistersPerMultiprocessor, rt.cudaDevAttrMaxSharedMemoryPerMultiprocessor,
        rt.cudaDevAttrMaxThreadsPerMultiProcessor, rt.cudaDevAttrMultiProcessorCount))


def _e4m3_tensor_cores() -> bool:
    """Whether the current GPU's mma.sync takes e4m3 operands (compute capability >= 8.9)."""
    cc = cupy_module().cuda.Device().compute_capability  # "90", "89", "120"
    return (int(cc[:-1]), int(cc[-1])) >= (8, 9)


def _aligned16(*arrays) -> bool:
    """Whether every array starts 16-byte aligned (a caller's weight view may not; our own
    buffers do)."""
    return all(a.data.ptr % 16 == 0 for a in arrays)


def _vec16(Kd: int, W) -> bool:
    """Whether the fp8 kernels may read W's rows of Kd bytes 16 at a time: Kd a multiple of 16
    and W 16-byte aligned (the activations are our buffers)."""
    return Kd % 16 == 0 and _aligned16(W)


def _pair_mma_ready(Kd: int, W) -> bool:
    """Whether pair_mma_fp8 serves a GEMM of reduction size Kd over W on the current GPU."""
    return PAIR_MMA and _vec16(Kd, W) and _e4m3_tensor_cores()


def pairs_fp8(x, ids, w13, s13, w2, s2, mark):
    """x quantized per row (a small kernel), the pair kernel for GEMM 1 (h in fp32), h
    quantized per row, the pair kernel for GEMM 2; launches of at most 65535 pairs."""
    cp = cupy_module()
    x = cp.ascontiguousarray(x)  # a few rows: the quantize kernel reads packed rows
    T, H = x.shape
    E, I = w13.shape[0], w13.shape[1] // 2
    K = ids.shape[1]
    P = T * K
    ctype = DTYPES[dtype_name(x.dtype)][1]
    mod = quant.fp8_module()
    hb, ib = quant.blocks(H), quant.blocks(I)
    slot_rows = cp.empty((T, K), np.int32)
    xq = cp.empty((T, H), np.uint8)
    xsc = cp.empty((T, hb), np.float32)
    h = cp.empty((P, I), np.float32)  # fp32: h is quantized from fp32 (docs/spec.md)
    hq = cp.empty((P, I), np.uint8)
    hsc = cp.empty((P, ib), np.float32)
    rows = cp.empty((P, H), rows_dtype(x.dtype))  # fp16 layers: fp32 (rows_dtype)
    if P:
        mod.get_function(f"quantize_rows<{ctype}>")(
            _quantize_grid(T, H), (128,),
            (x, np.int32(T), np.int32(H), _NULL, np.int32(0), np.int32(0), xq, xsc, _NULL))
    mark("permute")
    chunk = 65535
    passes = ((True, xq, xsc, K, w13, s13, I, H, h, f"{ctype},float"),
              (False, hq, hsc, 1, w2, s2, H, I, rows, f"{ctype},{out_ctype(ctype)}"))
    for glu, aq, asc, div, W, S, N, Kd, out, types in passes:
        if P and not glu:
            mod.get_function("quantize_rows<float>")(
                _quantize_grid(P, I), (128,),
                (h, np.int32(P), np.int32(I), _NULL, np.int32(0), np.int32(0), hq, hsc, _NULL))
        if _pair_mma_ready(Kd, W):
            ksplit = next(n for most, n in PAIR_MMA_KSPLIT if most is None or P <= most)
            features = _PM_FEATS // ksplit
            kernel = mod.get_function(f"pair_mma_fp8<{types},{str(glu).lower()},{ksplit}>")
        else:
            features = PAIR_ROWS[glu]
            vec = str(_vec16(Kd, W)).lower()
            kernel = mod.get_function(
                f"pair_gemv_fp8<{types},{features},{str(glu).lower()},{vec}>")
        for p0 in range(0, P, chunk):
            n = min(chunk, P - p0)
            kernel((-(-N // (PAIR_WARPS * features)), n), (32 * PAIR_WARPS,),
                   (aq, asc, np.int32(div), ids, np.int32(E), W, S, np.int32(N), np.int32(Kd),
                    out, slot_rows, np.int64(p0)))
        if glu:
            mark("gemm1")
            mark("activation")  # fused into the first pass (h's quantization runs before GEMM 2)
    mark("gemm2")
    return ExpertOutput(rows, slot_rows)


def _lt_may_serve(H: int, I: int) -> bool:
    """Whether cuBLASLt's block-scaled FP8 GEMM may serve a layer of shape (H, I) on this GPU
    before its self-check: H and I multiples of 128, FP8 tensor cores (compute capability
    >= 8.9; LT_REFUSAL set where not), and on 9.x only with LT_INEXACT_SUMS."""
    global LT_REFUSAL
    if LT_REFUSAL is not None or H % 128 or I % 128:
        return False
    cc = cupy_module().cuda.Device().compute_capability  # "90", "89", "120"
    if (int(cc[:-1]), int(cc[-1])) < (8, 9):
        LT_REFUSAL = f"compute capability {cc[:-1]}.{cc[-1]} has no FP8 tensor cores (>= 8.9)"
        return False
    return LT_INEXACT_SUMS or cc[:-1] != "9"


def _lt_layout(H: int, I: int, dtype: str):
    """How to call cuBLASLt's block-scaled FP8 GEMM for a layer of x's ``dtype`` and shape
    (H, I): (weight scales transposed, activation scales M-major), or None where it cannot
    serve (LT_REFUSAL or LT_REFUSED says why, but for what _lt_may_serve rules out by shape
    or, on compute capability 9.x, by LT_INEXACT_SUMS)."""
    cp = cupy_module()
    if (dtype, H, I) in LT_REFUSED or not _lt_may_serve(H, I):
        return None
    key = (cp.cuda.runtime.getDevice(), dtype, H, I)
    if key not in _LT_LAYOUTS:
        # the two GEMMs as gemm_fp8 calls them: gate/up into x's dtype, down into rows_dtype
        gemms = ((2 * I, H, DTYPES[dtype][0]), (H, I, rows_dtype(DTYPES[dtype][0])))
        try:
            _LT_LAYOUTS[key], notes = _lt_self_check(gemms)
        except Exception as exc:  # e.g. out of memory: decided once, not at every call
            _LT_LAYOUTS[key], notes = None, [f"the self-check failed: {exc!r}"]
        if _LT_LAYOUTS[key] is None:
            LT_REFUSED[dtype, H, I] = "cuBLASLt block-scaled FP8 GEMM unusable: " + \
                "; ".join(notes)
    return _LT_LAYOUTS[key]


_LT_LAYOUTS: dict = {}


def _lt_weight_scales(s, w_t: bool):
    """Weight scales [..., N/128, K/128] as layout ``w_t`` hands them to cuBLASLt: transposed
    to [..., K/128, N/128]; or as they are, each row padded with zeros to a multiple of 4
    scales (the leading dimension of 128x128 block scales: round_up(K/128, 4) in PyTorch's
    checks of its blockwise scaled GEMMs), which needs no copy where K/128 is a multiple of
    4 (LongCat-Flash, DeepSeek-V3). The self-check and the path both take them from here.
    ``s``: a CuPy or NumPy fp32 array; the result is of the same kind."""
    xp = np if isinstance(s, np.ndarray) else cupy_module()
    if w_t:
        return xp.ascontiguousarray(xp.swapaxes(s, -1, -2))
    kb = s.shape[-1]
    if kb % 4 == 0:
        return xp.ascontiguousarray(s)
    padded = xp.zeros(s.shape[:-1] + (kb + (-kb) % 4,), np.float32)
    padded[..., :kb] = s
    return padded


# Row counts the self-check runs: the padded path's smallest (PAD_ROWS) and a large one (each
# row count is a plan of cuBLASLt's own, which may pick another kernel).
LT_CHECK_ROWS = (PAD_ROWS, 1024)


def _lt_self_check(gemms):
    """Run the GEMM on random e4m3 operands and scales of each (n, k, output dtype) in
    ``gemms`` (the layer's own: a layout that gave the product at K = 512 read the weight
    scales wrongly at K = 256, relative error 0.17, H200, cuBLAS 13.1), for LT_CHECK_ROWS rows,
    against their dequantized product, with the documented scale layouts first (weights
    [N/128, K/128] with rows padded to 4 scales, activations M-major) and the transposed
    ones after: (the first layout that gives every product, notes), or (None, why each
    failed). Other row counts use the layout found. One-time cost per layer dtype and shape:
    a few GEMMs and their fp32 products (about 0.5 GB of temporaries at LongCat-Flash's
    shapes)."""
    from ..reference import relative_error
    cp = cupy_module()
    rs = cp.random.RandomState(0)

    def random_e4m3(rows, cols):  # every finite code but 0x7f / 0xff (NaN)
        codes = rs.randint(0, 254, (rows, cols), dtype=np.int32)
        return (codes + (codes >= 127)).astype(np.uint8)

    def random_scales(shape):  # small enough that an fp16 output holds the sums
        return (rs.uniform(0.5, 2.0, shape) / 64).astype(np.float32)

    cases = []
    for n, k, out_dtype in gemms:
        for m in LT_CHECK_ROWS:
            qw, qx = random_e4m3(n, k), random_e4m3(m, k)
            sw, sx = random_scales((n // 128, k // 128)), random_scales((m, k // 128))
            w = quant.dequantize_weight(qw, sw)
            x = quant.e4m3_to_f32(qx) * cp.repeat(sx, 128, 1)
            ref = (x @ w.T).get()  # fp32 sums: ~1e-6, against a bound of 2e-2
            del w, x
            cases.append((qw, sw, qx, sx, out_dtype, ref))
    notes = []
    for w_t, x_mm in ((False, True), (True, True), (False, False), (True, False)):
        name = (f"weight scales {'[K/128, N/128]' if w_t else '[N/128, K/128 padded to 4]'}, "
                f"activation scales {'M' if x_mm else 'K'}-major")
        for qw, sw, qx, sx, out_dtype, ref in cases:
            m, (n, k) = qx.shape[0], qw.shape
            out = cp.empty((m, n), out_dtype)
            try:
                _cublas.fp8_gemm_nt(qw, _lt_weight_scales(sw, w_t), qx,
                                    cp.ascontiguousarray(sx.T if x_mm else sx).ravel(), out, m)
                err = relative_error(out.get().astype(np.float32), ref)
            except (_cublas.CublasLtError, RuntimeError, OSError) as exc:
                notes.append(f"{name}: {exc}")
                break
            if not err < 2e-2:  # NaN included
                notes.append(f"{name}: wrong product at m={m} n={n} k={k} "
                             f"{np.dtype(out_dtype).name} out (rel. error {err:.1e})")
                break
        else:
            return (w_t, x_mm), notes
    return None, notes


def gemm_fp8(x, ids, w13, s13, w2, s2, expert_counts, mark):
    cp = cupy_module()
    T, H = x.shape
    E, I = w13.shape[0], w13.shape[1] // 2
    ctype = DTYPES[dtype_name(x.dtype)][1]
    mod, qmod = experts_module(), quant.fp8_module()
    scales_in = (s13, s2)
    counts = real_counts(ids, expert_counts, E)
    counts_host = counts.get().astype(np.int64)  # the one host synchronization of the pass
    active = np.nonzero(counts_host)[0]
    # Rows of each expert padded to PAD_ROWS: cuBLASLt wants M a multiple of 4 (and 16-byte
    # aligned rows), and every active expert is one GEMM.
    starts, rows_total, _ = tile_plan(counts_host, PAD_ROWS, MAX_TILE)
    padded = -(-counts_host // PAD_ROWS) * PAD_ROWS
    offsets, slot_rows, xs = gather(mod, ctype, x, ids, counts, E, PAD_ROWS, rows_total)
    gate_up = cp.empty((rows_total, 2 * I), x.dtype)
    rows = cp.empty((rows_total, H), rows_dtype(x.dtype))  # fp16 layers: fp32 (rows_dtype)
    mark("permute")
    if rows_total == 0:
        for stage in ("gemm1", "activation", "gemm2"):
            mark(stage)
        return ExpertOutput(rows, slot_rows)
    grid_rows = -(-rows_total // 4)
    # cuBLASLt wants 16-byte aligned operands (H, I multiples of 128 keep each expert's slice
    # of aligned weights aligned)
    layout = _lt_layout(H, I, dtype_name(x.dtype)) if _aligned16(w13, w2) else None
    if layout is not None:
        w_t, x_mm = layout
        s13, s2 = (_lt_weight_scales(s, w_t) for s in (s13, s2))
        xq = cp.empty((rows_total, H), np.uint8)
        xsc = cp.empty(rows_total * (H // 128), np.float32)
        qmod.get_function(f"quantize_rows<{ctype}>")(
            _quantize_grid(rows_total, H), (128,),
            (xs, np.int32(rows_total), np.int32(H), offsets, np.int32(E), np.int32(x_mm), xq,
             xsc, _NULL))
        hq = cp.empty((rows_total, I), np.uint8)
        hsc = cp.empty(rows_total * (I // 128), np.float32)
        try:
            for e in active:
                s, m = starts[e], int(padded[e])
                _cublas.fp8_gemm_nt(w13[e], s13[e], xq[s:s + m], xsc[s * (H // 128):],
                                    gate_up[s:s + m], m)
            mark("gemm1")
            qmod.get_function(f"silu_mul_quantize<{ctype}>")(
                (grid_rows, I // 128), (128,),
                (gate_up, np.int32(rows_total), np.int32(I), offsets, np.int32(E),
                 np.int32(x_mm), hq, hsc, _NULL))
            mark("activation")
            for e in active:
                s, m = starts[e], int(padded[e])
                _cublas.fp8_gemm_nt(w2[e], s2[e], hq[s:s + m], hsc[s * (I // 128):],
                                    rows[s:s + m], m)
            mark("gemm2")
            return ExpertOutput(rows, slot_rows)
        except (_cublas.CublasLtError, OSError) as exc:  # e.g. a small K (see above)
            LT_REFUSED[dtype_name(x.dtype), H, I] = f"cuBLASLt refused: {exc}"
            s13, s2 = scales_in
    # Fallback: fp32 GEMMs over the dequantized weights and activations a' = q * sa (exact in
    # fp32); gate / up and the output rounded to x's dtype after. Rounding a' or the weights
    # to bf16 instead measured about 1.5e-2 against the reference (SPEC allows 5e-3).
    xd = cp.empty((rows_total, H), np.float32)
    qmod.get_function(f"quantize_rows<{ctype}>")(
        _quantize_grid(rows_total, H), (128,),
        (xs, np.int32(rows_total), np.int32(H), offsets, np.int32(E), np.int32(1), _NULL,
         _NULL, xd))
    acc = cp.empty((rows_total, 2 * I), np.float32)
    for e in active:
        s, n = starts[e], int(counts_host[e])
        W = quant.dequantize_weight(w13[e], s13[e], glu=True)
        _cublas.gemm_nt(W, xd[s:s + n], acc[s:s + n])
    gate_up[...] = acc.astype(x.dtype)
    mark("gemm1")
    hd = cp.empty((rows_total, I), np.float32)
    qmod.get_function(f"silu_mul_quantize<{ctype}>")(
        (grid_rows, (I + 127) // 128), (128,),
        (gate_up, np.int32(rows_total), np.int32(I), offsets, np.int32(E), np.int32(1), _NULL,
         _NULL, hd))
    mark("activation")
    acc = cp.empty((rows_total, H), np.float32)
    for e in active:
        s, n = starts[e], int(counts_host[e])
        W = quant.dequantize_weight(w2[e], s2[e], glu=False)
        _cublas.gemm_nt(W, hd[s:s + n], acc[s:s + n])
    rows[...] = acc.astype(rows.dtype)
    mark("gemm2")
    return ExpertOutput(rows, slot_rows)
