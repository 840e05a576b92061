"""CUDA-graph replay of a GPU layer's whole forward (docs/spec.md "CUDA-graph replay").

``layer.graphed(max_tokens=...)`` captures the forward (router, routing, experts, combine) once
per token count in a set of sizes; a call with T tokens copies x into the static input of the
smallest captured size >= T, replays that graph and returns the first T rows. Replay skips the
host work of an eager call (argument checks, a dozen kernel launches through Python), which is
most of a decode step's time.

The captured forward makes no host synchronization: the router GEMM runs through our cuBLAS
shim (CuPy refuses its own cuBLAS wrappers during capture), the experts through the "pairs"
path (T*K up to experts.pairs_max, as eagerly), the "syncfree" path above it, whose
per-expert counts stay on the device, and for unquantized bf16 layers the "capacity" path
(blocks of a fixed number of rows for every expert) where experts.capacity.prefers it; "fixed"
for deterministic layers. Padding rows (T < size) are zero-filled and then masked after
routing: their slots go to no expert, so they cost no weight reads.
The package's kernels are captured with programmatic dependent launch (_compile.py) on GPUs
of compute capability 9.0 and later: a node's blocks start during the previous node's last
wave and wait there. It saves little: a graph's kernel-to-kernel step measured 1.41 us plain
and 1.26 us so (H200, benchmarks/pdl_chain.py).
"""
from __future__ import annotations

import bisect
from typing import Any, Sequence

import numpy as np

from ._arrays import check_int, cupy_module, np_dtype
from ._compile import programmatic_launches
from .experts import capacity
from .experts._common import pairs_max

# vLLM's decode batch sizes up to 512, then steps of SIZE_STEP; max_tokens is always included.
DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
SIZE_STEP = 256
# Capture with programmatic dependent launch where the GPU has it (False: plain launches, e.g.
# to measure what it gains; read at construction).
PROGRAMMATIC_LAUNCH = True
# Layer strategies a graph can run as they are (no host synchronization).
_SYNC_FREE = ("pairs", "fixed", "syncfree", "capacity")


def default_capture_sizes(max_tokens: int) -> tuple[int, ...]:
    """DEFAULT_SIZES below max_tokens, then steps of SIZE_STEP, then max_tokens itself."""
    sizes = [s for s in DEFAULT_SIZES if s < max_tokens]
    s = DEFAULT_SIZES[-1] + SIZE_STEP
    while s < max_tokens:
        sizes.append(s)
        s += SIZE_STEP
    return tuple(sizes) + (max_tokens,)


def _sizes(max_tokens, capture_sizes) -> tuple[int, ...]:
    if max_tokens is not None:
        max_tokens = check_int("max_tokens", max_tokens, 1)
    if capture_sizes is None:
        if max_tokens is None:
            raise ValueError("max_tokens: expected a positive int (or capture_sizes), got None")
        return default_capture_sizes(max_tokens)
    try:
        sizes = list(capture_sizes)
    except TypeError:
        raise TypeError(f"capture_sizes: expected a sequence of positive ints, got "
                        f"{type(capture_sizes).__name__}") from None
    if not sizes:
        raise ValueError("capture_sizes: expected a non-empty sequence of positive ints, got "
                         f"{capture_sizes!r}")
    sizes = [check_int(f"capture_sizes[{i}]", s, 1) for i, s in enumerate(sizes)]
    sizes = sorted(set(sizes))
    if max_tokens is not None and sizes[-1] != max_tokens:
        raise ValueError(f"capture_sizes: expected the largest size to equal max_tokens="
                         f"{max_tokens}, got {sizes[-1]}")
    return tuple(sizes)


def graph_strategy(layer, tokens: int) -> str:
    """The expert strategy a graph of ``tokens`` rows runs: the layer's own when it is
    sync-free (a layer of "pairs" above 65535 (token, slot) pairs, the pair kernels' limit,
    takes "syncfree"), else "pairs" for up to pairs_max pairs (the eager "auto" rule: 128 for
    bf16 and fp8 layers, 320 else), "capacity" for unquantized bf16 layers where
    capacity.prefers (from 13 pairs per expert while its blocks stay at most 64 rows),
    "syncfree" otherwise. Each strategy falls back as it does eagerly ("syncfree" and
    "capacity" to "fixed" where their 16-byte loads cannot serve: H or I not a multiple of 8,
    fp32 layers)."""
    strategy, cfg = layer.expert_strategy, layer.config
    K = cfg.top_k
    if strategy in _SYNC_FREE and not (strategy == "pairs" and tokens * K > 65535):
        return strategy
    if tokens * K <= pairs_max(cfg.dtype, cfg.quantization):
        return "pairs"
    if (cfg.dtype == "bfloat16" and cfg.quantization is None
            and capacity.prefers(tokens, K, cfg.num_experts)):
        return "capacity"
    return "syncfree"


class GraphedMoE:
    """A GPU layer's forward captured as CUDA graphs, one per token count.

    ``g(x)``: x a CuPy array [T, H] of the layer's dtype with 1 <= T <= max_tokens (T = 0
    gives an empty result) -> a new CuPy array [T, H], ordered on the caller's current stream
    like any CuPy operation. ``router_logits=True`` at construction captures graphs that take
    the caller's logits: then ``g(x, router_logits=L)`` with L [T, E+Z] is required.
    A real row's result equals the eager forward's for that token up to the summation order
    of the expert path the graph runs (bit for bit where the eager layer takes that path too,
    e.g. ``expert_strategy="syncfree"``).

    Construction warms up and captures every size, largest first, on a private stream, with
    one private memory pool shared by all sizes; it holds that memory (about the eager
    workspace of max_tokens) for its lifetime. The graphs read the weights through the
    pointers captured: writing into a weight array in place is seen by later replays;
    assigning a new array to the layer (``layer.w13 = ...``) is not: call ``graphed`` again.
    (As in the eager layer, the bf16 split of the router weight that sizes from
    BF16X3_MIN_TOKENS use is made once: assign a new router weight rather than writing in it.)
    Calls run one at a time on the private stream (safe from several streams, not from
    several threads at once).

    Raises (construction): TypeError if ``layer`` is not a ZeroExpertMoE, ValueError if it is
    not on the GPU, is an expert-parallel rank layer, or for bad sizes. Calls: the layer's own
    errors for x's kind, shape and dtype; ValueError for T > max_tokens or a missing or
    unexpected ``router_logits``.
    """

    def __init__(self, layer, max_tokens: int | None = None,
                 capture_sizes: Sequence[int] | None = None, *, router_logits: bool = False):
        from .layer import ZeroExpertMoE
        if not isinstance(layer, ZeroExpertMoE):
            raise TypeError(f"layer: expected a ZeroExpertMoE, got {type(layer).__name__}")
        if layer.device != "cuda":
            raise ValueError(f"layer: CUDA graphs need a GPU layer, got one on device "
                             f"{layer.device!r}; build it with device='cuda'")
        if getattr(layer, "group", None) is not None:
            raise ValueError("layer: CUDA graphs of an expert-parallel rank layer (group=...) "
                             "are not supported; graph a layer without a group")
        if not isinstance(router_logits, bool):
            raise TypeError(f"router_logits: expected a bool, got {router_logits!r}")
        if layer.config.gating_residual and not router_logits:
            # The graphs hold no previous layer's logits: the caller computes L with them.
            raise ValueError("layer: a layer with gating_residual is graphed with "
                             "router_logits=True (pass L = router(x) + gate_map @ L_prev)")
        if layer.router_weight is None and not router_logits:
            raise ValueError("layer: a layer without a router weight is graphed with "
                             "router_logits=True")
        self.capture_sizes = _sizes(max_tokens, capture_sizes)
        self.max_tokens = self.capture_sizes[-1]
        self.takes_router_logits = router_logits
        self.layer = layer
        cp = cupy_module()
        cfg = layer.config
        H, N = cfg.hidden_size, cfg.num_total_experts
        # The arrays whose pointers the graphs hold: kept alive even if the layer drops them.
        self._weights = tuple(getattr(layer, name, None) for name in layer.WEIGHT_NAMES)
        # Compile every kernel and fill the layer's caches with the caller's allocator, so
        # nothing the layer keeps comes out of the private pool.
        layer.warmup()
        self._router_parts = layer._router_parts(self.max_tokens)
        self._stream = cp.cuda.Stream(non_blocking=True)
        self._pool = cp.cuda.MemoryPool()
        self._ready = cp.cuda.Event(disable_timing=True)
        self._done = cp.cuda.Event(disable_timing=True)
        self._graphs: dict[int, tuple[Any, Any]] = {}
        self._ready.record()
        self._stream.wait_event(self._ready)  # the weights as the caller's stream leaves them
        with cp.cuda.using_allocator(self._pool.malloc), self._stream:
            dtype = np_dtype(layer.config.dtype)  # not w13's: e4m3 weights are uint8
            self._x = cp.zeros((self.max_tokens, H), dtype)
            self._logits = cp.zeros((self.max_tokens, N), np.float32) if router_logits else None
            self._tokens = cp.arange(self.max_tokens + 1, dtype=np.int32)  # n_valid sources
            self._n_valid = cp.empty(1, np.int32)
            self._valid = None  # the value n_valid holds (None: unset)
            for size in reversed(self.capture_sizes):
                self._set_valid(size)
                self._forward(size)  # warm-up: compiles this size's kernels, fills the pool
                self._stream.begin_capture()
                try:
                    with programmatic_launches(PROGRAMMATIC_LAUNCH):
                        y = self._forward(size)
                finally:
                    graph = self._stream.end_capture()
                self._graphs[size] = (graph, y)
        self._stream.synchronize()

    def _set_valid(self, tokens: int) -> None:
        """n_valid = tokens on the private stream; skipped when it holds that already (only
        this stream writes it): a decode loop of one batch size copies nothing."""
        if tokens == self._valid:
            return
        cp = cupy_module()
        cp.cuda.runtime.memcpyAsync(self._n_valid.data.ptr, self._tokens.data.ptr + 4 * tokens,
                                    4, cp.cuda.runtime.memcpyDeviceToDevice, self._stream.ptr)
        self._valid = tokens

    def _forward(self, size: int):
        """The captured forward: static inputs' first ``size`` rows -> y [size, H]."""
        layer = self.layer
        x = self._x[:size]
        logits = self._logits[:size] if self._logits is not None else None
        routing, _ = layer._route(x, logits)
        if size > 1:  # rows past n_valid are padding: route them nowhere
            from .experts.syncfree import syncfree_module
            K = layer.config.top_k
            ids, weights, counts = routing
            syncfree_module().get_function("mask_padding_rows")(
                (-(-size * K // 256),), (256,),
                (ids, weights, counts, np.int32(counts.shape[0]), self._n_valid,
                 np.int32(size), np.int32(K)))
        return layer._forward_routed(x, routing, routing.expert_counts,
                                     graph_strategy(layer, size))

    def __call__(self, x, router_logits=None):
        """y [T, H] for x [T, H] (and the caller's logits [T, E+Z] when captured with them)."""
        cp = cupy_module()
        layer = self.layer
        x = layer._input(x)
        T = x.shape[0]
        if T > self.max_tokens:
            raise ValueError(f"x: expected at most max_tokens={self.max_tokens} rows (the "
                             f"largest captured size), got {T}")
        if self.takes_router_logits != (router_logits is not None):
            if router_logits is None:
                raise ValueError("router_logits: these graphs take the caller's logits "
                                 "(captured with router_logits=True); pass them")
            raise ValueError("router_logits: these graphs compute the logits themselves; "
                             "capture with layer.graphed(..., router_logits=True) to pass them")
        if router_logits is not None:
            router_logits = layer._logits_input(router_logits, T)
        if T == 0:
            return cp.empty(x.shape, x.dtype)
        size = self.capture_sizes[bisect.bisect_left(self.capture_sizes, T)]
        graph, y = self._graphs[size]
        s = self._stream
        self._ready.record()
        s.wait_event(self._ready)  # x (and the static buffers) as the caller's stream has them
        _copy_rows(self._x, x, T, size, s)
        if router_logits is not None:
            _copy_rows(self._logits, router_logits, T, size, s)
        if size > 1:
            self._set_valid(T)
        graph.launch(s)
        self._done.record(s)
        cp.cuda.get_current_stream().wait_event(self._done)
        return y[:T].copy()

    def __repr__(self) -> str:
        return (f"GraphedMoE({self.layer!r}, capture_sizes={self.capture_sizes}, "
                f"router_logits={self.takes_router_logits})")


def _copy_rows(buf, src, T: int, size: int, stream) -> None:
    """buf[:T] = src and buf[T:size] = 0, enqueued on ``stream``."""
    cp = cupy_module()
    runtime = cp.cuda.runtime
    row = buf.shape[1] * buf.itemsize
    if src.flags.c_contiguous and src.dtype == buf.dtype:
        runtime.memcpyAsync(buf.data.ptr, src.data.ptr, T * row,
                            runtime.memcpyDeviceToDevice, stream.ptr)
    else:
        with stream:
            buf[:T] = src
    if size > T:
        runtime.memsetAsync(buf.data.ptr + T * row, 0, (size - T) * row, stream.ptr)
