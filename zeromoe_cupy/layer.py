"""ZeroExpertMoE: owns the weights; forward = route -> real experts -> combine.

Shape legend (docs/spec.md): T tokens, H hidden, I expert intermediate, E real experts,
Z zero experts (ids E..E+Z-1), K experts per token, N = E + Z.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ._arrays import (as_array, check_bool, check_int, cupy_module, gpu_available, is_cupy,
                      is_float_dtype, np_dtype, resolve_device)
from . import checkpoint, quant
from .config import MoEConfig
from .experts import STRATEGIES, run_experts
from .routing import RoutingResult, compute_router_logits, route, split_bf16
from .zero_experts import combine, scaled_input

if TYPE_CHECKING:
    from .graphs import GraphedMoE

DEFAULT_MAX_CHUNK_TOKENS = 16384
ROUTER_GEMMS = ("auto", "fp32")
# "auto" takes bf16x3 from this many tokens up: below, its cuBLAS calls (2 + H / 512) cost
# more host time than the fp32 GEMM takes.
BF16X3_MIN_TOKENS = 512


class _ExpertsOnHost:
    """expert_array[e] as a host array, copied from the GPU when asked for."""

    def __init__(self, a):
        self.a = a
        self.shape = a.shape

    def __getitem__(self, e):
        return self.a[e].get()


class ZeroExpertMoE:
    """A Mixture-of-Experts layer with zero-computation experts, on NumPy or CuPy arrays.

    ``layer(x)`` computes y = sum_k w_k * expert_{ids_k}(x) (docs/spec.md). NumPy in -> NumPy
    out (device "cpu"); CuPy or DLPack CUDA tensors in -> CuPy out (device "cuda").
    ``device="auto"`` (default): "cuda" when a GPU is usable (``gpu_available()``), else "cpu";
    ``layer.device`` holds the one chosen. ``seed`` (an int >= 0) draws the random weights.
    Calls with more than ``max_chunk_tokens`` tokens run in chunks (route, experts, combine
    per chunk), which bounds the workspace: ``workspace_bytes()`` gives the bound, about
    ``max_chunk_tokens * K * (2H + 3I) * itemsize`` bytes for the expert stage.
    ``expert_strategy`` picks how the GPU runs the real experts ("auto": by token count and
    rows per expert; see ``experts.expert_mlp``); every choice computes the same values.
    ``router_gemm``: the router logits fp32(x) @ Wr^T are computed to fp32 accuracy either
    way. "auto" (default): for bf16 layers on the GPU and calls of BF16X3_MIN_TOKENS tokens or
    more, with bf16 tensor-core GEMMs over a three-way bf16 split of Wr summed in fp32
    ("bf16x3", ``ops.router_logits``' weight_parts; several times faster), else with an fp32 GEMM.
    "fp32": always the fp32 GEMM. The split of Wr is made once per router weight array:
    assign a new array to ``router_weight`` rather than writing into it.

    Determinism: the same inputs give the same bits on every call. ``deterministic=True``
    also makes a token's output independent of the batch it comes in (any T, any
    ``max_chunk_tokens``): on the GPU the router runs a fixed-order matrix-vector kernel at
    every T and the experts the "fixed" strategy (our tiled GEMM, one summation order); on the
    CPU the matmuls run as ordered float64 sums (slow). It costs speed on the GPU: no tensor cores
    for the experts, no GEMM for the router (measured in benchmarks/NOTES.md).

    Expert parallelism (docs/spec.md): with ``group=`` (``zm.parallel.init()`` or
    ``zm.parallel.local_groups``) the layer is rank ``group.rank``'s part: the router, all zero
    experts and the real experts [r*E/R, (r+1)*E/R) (``w13`` / ``w2`` hold that slice).
    ``layer(x_r)`` is collective (every rank calls it as often, with T_r = 0 when it has no
    tokens) and returns what the whole layer gives for x_r; ``route()`` stays local.
    Constructors never communicate; the random constructor draws the same full layer as
    without a group for the same seed and keeps the rank's slice. ``last_exchange`` gives the
    rows and bytes of the latest forward (parallel.exchange.ExchangeStats). A rank layer runs
    its calls unchunked over the exchange; ``max_chunk_tokens`` bounds the rows its expert
    stage takes per pass.

    MoE++ options (``MoEConfig``; docs/spec.md "MoE++ options"): ``router_hidden_weight`` W1
    [R, H] (two-layer router; ``router_weight`` is then W2 [E+Z, R]) and ``gate_map``
    [E+Z, E+Z] (gating residual) are None when the config does not use them.
    ``router_weight`` is None for a layer built without a router (every call then passes
    ``router_logits=``).

    NaN and Inf: ids are always valid. A token whose logits hold a NaN (or +Inf under
    softmax) gets NaN scores, is routed to the lowest ids with NaN weights, and its output
    row is NaN; other tokens are unaffected. A NaN in one token's x stays in that row.
    """

    def __init__(self, config: MoEConfig, seed: int = 0, device: str = "auto",
                 max_chunk_tokens: int = DEFAULT_MAX_CHUNK_TOKENS, *,
                 expert_strategy: str = "auto", router_gemm: str = "auto",
                 deterministic: bool = False, group=None, _weights=None, _scales=None,
                 _router_extra=None):
        _check_config(config)
        seed = check_int("seed", seed, 0)
        device = resolve_device(device)
        options = _checked_options(expert_strategy, router_gemm, deterministic,
                                   max_chunk_tokens)
        _check_group(group, config)
        self.group = group
        self.config = config
        self.device = device
        self.expert_strategy = options["expert_strategy"]
        self.router_gemm = options["router_gemm"]
        self.deterministic = options["deterministic"]
        self.max_chunk_tokens = options["max_chunk_tokens"]
        self.xp = cupy_module() if device == "cuda" else np
        if _weights is None:
            _weights = self._random_weights(int(seed))
            if config.quantization == "fp8":  # random weights in cfg.dtype, then quantized
                w13, s13 = quant.quantize_weight(_weights[3], glu=True)
                w2, s2 = quant.quantize_weight(_weights[4])
                _weights = _weights[:3] + (w13, w2) + _weights[5:]
                _scales = (s13, s2)
            _router_extra = self._random_router_extra(int(seed))
        (self.router_weight, self.router_bias, self.e_score_correction_bias,
         self.w13, self.w2, self.const_vec, self.const_gate) = _weights
        self._exchange = None
        if group is not None:
            from .parallel.exchange import Exchange
            self._exchange = Exchange(group, config.num_experts, config)
        # FP8 experts: fp32 block scales of w13 / w2 (None for unquantized layers).
        self.w13_scale_inv, self.w2_scale_inv = _scales if _scales is not None else (None, None)
        # MoE++ router weights: W1 [R, H] of the two-layer router, gate_map [N, N]
        self.router_hidden_weight, self.gate_map = _router_extra or (None, None)
        self._weights_ready = True  # from here on, assigned weights and options are checked

    def __setattr__(self, name, value):
        if name in ("config", "device", "group") and "_weights_ready" in self.__dict__:
            # The weights, kernels and exchange were built for these: a new layer is needed.
            raise AttributeError(f"{name}: fixed when the layer is built; build a new layer "
                                 f"(e.g. ZeroExpertMoE.from_weights(config, "
                                 f"**layer.numpy_weights()))")
        if name in self.OPTION_NAMES and "_weights_ready" in self.__dict__:
            # checked as the constructor checks it, against the other options held
            options = _checked_options(**{**self.options(), name: value})
            value = options[name]
            if name == "deterministic":  # deterministic=True runs the "fixed" expert path
                object.__setattr__(self, "expert_strategy", options["expert_strategy"])
        if name in self.WEIGHT_NAMES and "_weights_ready" in self.__dict__:
            value = self._checked_weight(name, value)
            if name == "router_weight":  # the bf16x3 parts belong to the old array
                self.__dict__.pop("_router_parts_cache", None)
        object.__setattr__(self, name, value)

    def _checked_weight(self, name: str, a):
        """An array assigned to a weight attribute, checked as from_weights checks it (shape
        from the config, E/R experts on a rank layer; dtype as the layer holds it; the
        layer's device; C-contiguous) and kept as given, so that later in-place writes
        reach the layer. None only where the layer may go without the array."""
        cfg = self.config
        optional = name == "e_score_correction_bias" and not cfg.use_correction_bias or \
            name == "router_bias" and self.router_weight is not None
        held = getattr(self, name)
        if a is None:
            if held is None or optional:
                return None
            raise ValueError(f"{name}: this layer needs the array, got None (build a new layer "
                             f"with from_weights to change which arrays it has)")
        if held is None and not optional:
            raise ValueError(f"{name}: this layer has no {name} (its config or construction "
                             f"leaves it out), got an array; build a new layer with from_weights")
        a = as_array(a, name)
        if is_cupy(a) != (self.device == "cuda"):
            raise TypeError(f"{name}: expected a {'CuPy' if self.device == 'cuda' else 'NumPy'} "
                            f"array (the layer's device, {self.device}), got "
                            f"{type(a).__module__}.{type(a).__name__}")
        shape, dtype = checkpoint.layer_weight_specs(cfg)[name]
        if name in ("w13", "w2", "w13_scale_inv", "w2_scale_inv"):
            lo, hi = _expert_slice(self.group, cfg.num_experts)
            shape = (hi - lo,) + shape[1:]  # a rank layer holds its experts only
        if tuple(a.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(a.shape)}")
        if dtype == quant.E4M3 and a.dtype == np.uint8 and self.device == "cpu":
            a = a.view(quant.E4M3)  # e4m3 bits, as from_weights takes them
        if dtype == quant.E4M3 and self.device == "cuda":
            dtype = np.dtype(np.uint8)  # CuPy has no float8 dtype: the GPU holds the bits
        if a.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (the layer's), got {a.dtype}; "
                            f"cast it with .astype first")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous array, got strides "
                             f"{a.strides}; pass ascontiguousarray({name})")
        if name.endswith("_scale_inv"):
            _check_block_scales(name, a)
        return a

    @property
    def dtype(self) -> np.dtype:
        """The NumPy dtype x and y have (the config's dtype; FP8 layers included, whose
        w13 / w2 hold e4m3)."""
        return np_dtype(self.config.dtype)

    # --- construction ------------------------------------------------------------------------
    def _random_weights(self, seed: int):
        cfg, xp = self.config, self.xp
        H, I, E, Z, N = (cfg.hidden_size, cfg.intermediate_size, cfg.num_experts,
                         cfg.num_zero_experts, cfg.num_total_experts)
        dt = np_dtype(cfg.dtype)
        rng = xp.random.default_rng(seed)

        lo, hi = _expert_slice(self.group, E)

        def normal(shape, scale, dtype, keep=None):
            # Drawn in fp32 a slab at a time so a 40 GB bf16 tensor needs no fp32 copy. With
            # keep=(lo, hi) every slab is drawn (the stream stays that of the full tensor) but
            # only rows lo..hi-1 are kept: a rank gets its slice of the one-GPU layer.
            lo, hi = keep or (0, shape[0])
            out = xp.empty((hi - lo,) + tuple(shape[1:]), dtype)
            step = max(1, (1 << 26) // max(1, int(np.prod(shape[1:]))))
            for s in range(0, shape[0], step):
                block = rng.standard_normal((min(step, shape[0] - s),) + tuple(shape[1:]),
                                            dtype=np.float32)
                a, b = max(s, lo), min(s + step, hi)
                if a < b:
                    out[a - lo:b - lo] = (block[a - s:b - s] * np.float32(scale)).astype(dtype)
            return out

        R = cfg.router_hidden_size
        router_weight = normal((N, H), H ** -0.5, np.float32) if R is None else \
            normal((N, R), R ** -0.5, np.float32)
        w13 = normal((E, 2 * I, H), H ** -0.5, dt, (lo, hi))
        w2 = normal((E, H, I), I ** -0.5, dt, (lo, hi))
        bias = xp.zeros(N, np.float32) if cfg.use_correction_bias else None
        const_vec = const_gate = None
        if cfg.has_constant_experts:
            const_vec = normal((Z, H), 1.0, dt)
            const_gate = normal((Z, 2, H), H ** -0.5, dt)
        return router_weight, None, bias, w13, w2, const_vec, const_gate

    def _random_router_extra(self, seed: int):
        """Random W1 [R, H] and gate_map [N, N] (fp32) where the config uses them."""
        cfg, xp = self.config, self.xp
        H, N, R = cfg.hidden_size, cfg.num_total_experts, cfg.router_hidden_size
        rng = xp.random.default_rng(seed + 1)
        w1 = gate_map = None
        if R is not None:
            w1 = rng.standard_normal((R, H), dtype=np.float32) * np.float32(H ** -0.5)
        if cfg.gating_residual:
            gate_map = rng.standard_normal((N, N), dtype=np.float32) * np.float32(N ** -0.5)
        return w1, gate_map

    @classmethod
    def from_weights(cls, config: MoEConfig, router_weight, w13, w2, e_score_correction_bias=None,
                     router_bias=None, const_vec=None, const_gate=None,
                     max_chunk_tokens: int = DEFAULT_MAX_CHUNK_TOKENS,
                     device: str | None = None, *, w13_scale_inv=None, w2_scale_inv=None,
                     router_hidden_weight=None, gate_map=None,
                     **options) -> "ZeroExpertMoE":
        """A layer over the given weights: NumPy, CuPy, or any DLPack tensor (torch, JAX).
        ``options``: the constructor's keyword options (expert_strategy, router_gemm,
        deterministic, group). With ``group=``, w13 / w2 are the full [E, ...] tensors and the
        rank keeps its slice [r*E/R, (r+1)*E/R) (no communication; ValueError when R does
        not divide E).

        ``device``: None (default) takes the arrays' device (all on one device, else
        TypeError); "cuda", "cpu" or "auto" put the layer there, copying the arrays that
        live elsewhere (NumPy <-> CuPy). Arrays on the layer's device (NumPy arrays on the
        CPU, CuPy arrays or DLPack tensors on the GPU) are taken without a copy when they
        already have the layer's dtype and a contiguous layout, so the layer shares their
        memory: writing into them changes the layer.

        FP8 experts (``config.quantization == "fp8"``): w13 / w2 are e4m3 (ml_dtypes
        float8_e4m3fn or uint8 bits on the host, uint8 bits as CuPy arrays, or DLPack float8
        tensors such as torch.float8_e4m3fn) with fp32 block scales ``w13_scale_inv``
        [E, 2*ceil(I/128), ceil(H/128)] and ``w2_scale_inv`` [E, ceil(H/128), ceil(I/128)].
        e4m3 weights under an unquantized config, unquantized weights under an fp8 config, or
        missing / misshapen scales raise an error naming the weight (``quantize`` makes an fp8
        layer from an unquantized one).

        ``router_weight``: [E+Z, H], or [E+Z, R] with ``router_hidden_weight`` [R, H] when the
        config has ``router_hidden_size`` R; None builds a layer without a router (every call
        must then pass ``router_logits=``). ``gate_map`` [E+Z, E+Z]: required by a config
        with ``gating_residual`` (unless the layer has no router), refused otherwise.
        ``const_vec`` [Z, H] / ``const_gate`` [Z, 2, H]: required by a config with "constant"
        zero experts, refused otherwise.
        """
        _check_option_names("from_weights", options, _LAYER_OPTIONS)
        _check_config(config)
        fp8 = config.quantization == "fp8"
        w13, w2 = _float8_as_uint8(w13, "w13"), _float8_as_uint8(w2, "w2")
        arrays = {"router_weight": router_weight, "w13": w13, "w2": w2,
                  "e_score_correction_bias": e_score_correction_bias,
                  "router_bias": router_bias, "const_vec": const_vec, "const_gate": const_gate,
                  "w13_scale_inv": w13_scale_inv, "w2_scale_inv": w2_scale_inv,
                  "router_hidden_weight": router_hidden_weight, "gate_map": gate_map}
        arrays = {k: as_array(v, k, allow_none=k not in ("w13", "w2"))
                  for k, v in arrays.items()}
        for k in ("w13", "w2"):
            if quant.is_e4m3(arrays[k]) != fp8:
                raise WeightFormatError(
                    f"{k}: e4m3 weights ({arrays[k].dtype}) need a config with "
                    f"quantization='fp8', got quantization=None; to run FP8 experts from "
                    f"unquantized weights use layer.quantize('fp8')" if not fp8 else
                    f"{k}: expected e4m3 weights (float8_e4m3fn or uint8 bits) for "
                    f"quantization='fp8', got {arrays[k].dtype}; use layer.quantize('fp8') "
                    f"to quantize unquantized weights")
            if fp8 and isinstance(arrays[k], np.ndarray):
                arrays[k] = arrays[k].view(np.uint8)  # bits: CuPy has no float8 dtype
            scale = arrays[k + "_scale_inv"]
            if fp8 and scale is None:
                raise ValueError(f"{k}_scale_inv: required with e4m3 {k} (quantization='fp8')")
            if not fp8 and scale is not None:
                raise ValueError(f"{k}_scale_inv: given for an unquantized layer "
                                 f"(quantization=None)")
        if device is None:
            on_gpu = {k: is_cupy(v) for k, v in arrays.items() if v is not None}
            device = "cuda" if on_gpu["w13"] else "cpu"
            for k, g in on_gpu.items():
                if g != (device == "cuda"):
                    raise TypeError(f"{k}: expected the same device as w13 ({device}), got "
                                    f"{'cuda' if g else 'cpu'}; or pass device= to move them")
        else:
            device = resolve_device(device)
            arrays = {k: _to_device(v, device) for k, v in arrays.items()}
        xp = cupy_module() if device == "cuda" else np
        cfg = config
        N = cfg.num_total_experts
        _check_group(options.get("group"), cfg)
        lo, hi = _expert_slice(options.get("group"), cfg.num_experts)
        specs = checkpoint.layer_weight_specs(cfg)
        _check_router_arrays(cfg, arrays)
        for k in ("const_vec", "const_gate"):  # else ignored: the experts would not be constant
            if arrays[k] is not None and not cfg.has_constant_experts:
                raise ValueError(f"{k}: the config has no 'constant' zero experts "
                                 f"(zero_expert_type={cfg.zero_expert_type!r}), got an array")
        out = {}
        for k, a in arrays.items():
            if a is None:
                out[k] = None
                continue
            expected, want = specs[k]
            if tuple(a.shape) != expected:
                raise ValueError(f"{k}: expected shape {expected}, got {tuple(a.shape)}")
            if k in ("w13", "w2", "w13_scale_inv", "w2_scale_inv"):
                a = a[lo:hi]  # the rank's experts (all of them without a group)
            if fp8 and k in ("w13", "w2"):  # e4m3: float8_e4m3fn on the host, uint8 on the GPU
                a = xp.ascontiguousarray(a)
                out[k] = a.view(np.uint8) if device == "cuda" else a.view(quant.E4M3)
                continue
            if not is_float_dtype(a.dtype):
                raise TypeError(f"{k}: expected a floating-point array, got {a.dtype}")
            out[k] = xp.ascontiguousarray(a.astype(want, copy=False))
            if k.endswith("_scale_inv"):
                _check_block_scales(k, out[k])
        if cfg.has_constant_experts and (out["const_vec"] is None or out["const_gate"] is None):
            raise ValueError("const_vec, const_gate: required by the config's 'constant' experts")
        if cfg.use_correction_bias and out["e_score_correction_bias"] is None:
            out["e_score_correction_bias"] = xp.zeros(N, np.float32)
        weights = (out["router_weight"], out["router_bias"], out["e_score_correction_bias"],
                   out["w13"], out["w2"], out["const_vec"], out["const_gate"])
        scales = (out["w13_scale_inv"], out["w2_scale_inv"]) if fp8 else None
        return cls(cfg, device=device, max_chunk_tokens=max_chunk_tokens, _weights=weights,
                   _scales=scales, _router_extra=(out["router_hidden_weight"], out["gate_map"]),
                   **options)

    def quantize(self, method: str = "fp8") -> "ZeroExpertMoE":
        """A new layer with FP8 experts (docs/spec.md "FP8 experts"): w13 / w2 as e4m3 with one
        fp32 scale per 128x128 block (gate and up blocked separately), on this layer's device;
        the router, its biases and the zero experts' parameters are copied unquantized.
        Raises TypeError for a method that is not a string, ValueError for an unknown method
        or an already quantized layer."""
        if not isinstance(method, str):
            raise TypeError(f"method: expected 'fp8', got {type(method).__name__} {method!r}")
        if method != "fp8":
            raise ValueError(f"method: expected 'fp8', got {method!r}")
        if self.config.quantization is not None:
            raise ValueError(f"quantize: the layer is already quantized "
                             f"({self.config.quantization!r})")
        w13, s13 = quant.quantize_weight(self.w13, glu=True, name="w13")
        w2, s2 = quant.quantize_weight(self.w2, name="w2")

        def copy(a):
            return None if a is None else a.copy()
        weights = (copy(self.router_weight), copy(self.router_bias),
                   copy(self.e_score_correction_bias), w13, w2, copy(self.const_vec),
                   copy(self.const_gate))
        cfg = dataclasses.replace(self.config, quantization="fp8")
        return type(self)(cfg, device=self.device, max_chunk_tokens=self.max_chunk_tokens,
                          expert_strategy=self.expert_strategy, router_gemm=self.router_gemm,
                          deterministic=self.deterministic, group=self.group, _weights=weights,
                          _scales=(s13, s2),
                          _router_extra=(copy(self.router_hidden_weight), copy(self.gate_map)))

    @classmethod
    def from_expert_weights(cls, config: MoEConfig, router_weight, gate, up, down,
                            e_score_correction_bias=None, router_bias=None, const_vec=None,
                            const_gate=None, max_chunk_tokens: int = DEFAULT_MAX_CHUNK_TOKENS,
                            **options) -> "ZeroExpertMoE":
        """A layer from per-expert matrices, as most checkpoints store them.

        ``gate[e]``, ``up[e]``: [I, H]; ``down[e]``: [H, I], for e in 0..E-1 (NumPy, CuPy or
        DLPack tensors). They are stacked into the fused w13 [E, 2I, H] (gate rows first) and
        w2 [E, H, I], which copies them once.
        """
        _check_config(config)
        w13, w2 = checkpoint.stack_expert_weights(config, gate, up, down)
        return cls.from_weights(config, router_weight, w13, w2, e_score_correction_bias,
                                router_bias, const_vec, const_gate, max_chunk_tokens, **options)

    @classmethod
    def from_state_dict(cls, config: MoEConfig, state_dict, prefix: str = "",
                        max_chunk_tokens: int = DEFAULT_MAX_CHUNK_TOKENS,
                        **options) -> "ZeroExpertMoE":
        """A layer from a checkpoint's tensors (a dict of name -> NumPy/CuPy/DLPack tensor);
        the key names are those of ``checkpoint.state_dict_weights``."""
        _check_config(config)
        weights = checkpoint.state_dict_weights(config, state_dict, prefix)
        return cls.from_weights(config, max_chunk_tokens=max_chunk_tokens, **weights, **options)

    # --- inputs ------------------------------------------------------------------------------
    def _input(self, x):
        x = as_array(x, "x")
        cfg = self.config
        if is_cupy(x) != (self.device == "cuda"):
            if self.device == "cuda":
                raise TypeError("x: expected a CUDA array for this GPU layer, got a host array; "
                                "move it with cupy.asarray(x) (or tensor.cuda()), or build the "
                                "layer with device='cpu'")
            raise TypeError("x: expected a NumPy array for this CPU layer, got a CUDA array; "
                            "use x.get() or build the layer with device='cuda'")
        if x.ndim != 2 or x.shape[1] != cfg.hidden_size:
            raise ValueError(f"x: expected shape [T, {cfg.hidden_size}], got {tuple(x.shape)}")
        if x.dtype != np_dtype(cfg.dtype):  # (the other byte order: as_array made it native)
            raise TypeError(f"x: expected dtype {cfg.dtype} (the config's), got {x.dtype}")
        return x

    def _logits_input(self, logits, T, name="router_logits", any_device=False):
        """logits checked (kind, device unless ``any_device``, shape [T, E+Z], float dtype)
        and as fp32."""
        logits = as_array(logits, name)
        N = self.config.num_total_experts
        if not any_device and is_cupy(logits) != (self.device == "cuda"):
            kind = "CUDA" if self.device == "cuda" else "NumPy"
            raise TypeError(f"{name}: expected a {kind} array like x")
        if tuple(logits.shape) != (T, N):
            raise ValueError(f"{name}: expected shape ({T}, {N}), got {tuple(logits.shape)}")
        if not is_float_dtype(logits.dtype):
            raise TypeError(f"{name}: expected a floating-point array (float32, "
                            f"bfloat16, float16, ...), got {logits.dtype}")
        with np.errstate(over="ignore"):  # beyond fp32's range: +-inf, as docs/spec.md says
            return logits.astype(np.float32, copy=False)

    def _check_logit_sources(self, router_logits, prev_router_logits, routing=None):
        """Which logits a call may take: raises ValueError for combinations that mean nothing."""
        if prev_router_logits is not None:
            if not self.config.gating_residual:
                raise ValueError("prev_router_logits: this layer has no gating residual "
                                 "(MoEConfig(gating_residual=True) adds one), got an array")
            # Given router_logits stand for L after the residual (docs/spec.md): no residual is
            # added to them, so prev_router_logits is checked and not used. routing= computes
            # no logits at all.
            if routing is not None:
                raise ValueError("prev_router_logits: not with routing= (a call with routing= "
                                 "computes no logits)")
        if self.router_weight is None and router_logits is None and routing is None:
            raise ValueError("router_logits: required by this layer, built without a router "
                             "weight (from_weights(router_weight=None)), got None")

    def _routing_input(self, routing, T, any_device=False):
        """The caller's routing checked (kinds, device unless ``any_device``, shapes, dtypes,
        ids in [0, E+Z)) and as int32 ids / fp32 weights. Its expert_counts are not used: the layer counts the ids
        itself, so counts that do not match the ids cannot misplace a row. The range check
        is one reduction (and on the GPU one host synchronization) that the layer's own
        routing never pays."""
        cfg = self.config
        if not isinstance(routing, RoutingResult):
            raise TypeError(f"routing: expected a RoutingResult from layer.route(), got "
                            f"{type(routing).__name__}")
        K, N = cfg.top_k, cfg.num_total_experts
        out = {}
        for name, kind in (("topk_ids", "an integer"), ("topk_weights", "a floating-point")):
            a = as_array(getattr(routing, name), f"routing.{name}")
            if not any_device and is_cupy(a) != (self.device == "cuda"):
                raise TypeError(f"routing.{name}: expected a "
                                f"{'CuPy' if self.device == 'cuda' else 'NumPy'} array "
                                f"(the layer's device, {self.device}), got {type(a).__module__}")
            if tuple(a.shape) != (T, K):
                raise ValueError(f"routing.{name}: expected shape ({T}, {K}) for this x, "
                                 f"got {tuple(a.shape)}")
            ok = a.dtype.kind in "iu" if name == "topk_ids" else is_float_dtype(a.dtype)
            if not ok:
                raise TypeError(f"routing.{name}: expected {kind} array, got {a.dtype}")
            out[name] = a
        ids = out["topk_ids"]
        if ids.size and bool(((ids < 0) | (ids >= N)).any()):
            raise ValueError(f"routing.topk_ids: expected ids in [0, {N}) (E+Z), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return RoutingResult(ids.astype(np.int32, copy=False),
                             out["topk_weights"].astype(np.float32, copy=False), None)

    # --- forward -----------------------------------------------------------------------------
    def route(self, x, router_logits=None, *, prev_router_logits=None) -> RoutingResult:
        """Routing (docs/spec.md, steps 1-7) for x [T, H]: ids int32 [T, K], weights fp32
        [T, K], expert_counts int32 [E+Z]. ``router_logits``: the caller's logits [T, E+Z] in
        any float dtype (bf16 from a bf16 router included), used in fp32.
        ``prev_router_logits`` [T, E+Z] as in ``__call__``."""
        x = self._input(x)
        self._check_logit_sources(router_logits, prev_router_logits)
        T = x.shape[0]
        if router_logits is not None:
            router_logits = self._logits_input(router_logits, T)
        if prev_router_logits is not None:
            prev_router_logits = self._logits_input(prev_router_logits, T, "prev_router_logits")
        return self._route(x, router_logits, prev_router_logits)[0]

    def _route(self, x, logits, prev=None):
        """(routing, L): L the logits after the gating residual, before the normalization."""
        if logits is None:
            logits = self._logits(x, prev)
        return self._route_logits(logits), logits

    def _route_logits(self, logits):
        """docs/spec.md steps 2-7 on the layer's logits L [T, E+Z] fp32."""
        cfg = self.config
        drop_zero = isinstance(cfg.renormalize, str)
        return route(logits, cfg.top_k, scoring_func=cfg.scoring_func,
                     e_score_correction_bias=self.e_score_correction_bias,
                     renormalize=cfg.renormalize,
                     routed_scaling_factor=cfg.routed_scaling_factor,
                     num_expert_group=cfg.num_expert_group, topk_group=cfg.topk_group,
                     drop_experts=cfg.drop_experts if drop_zero else None,
                     logits_norm_std=cfg.router_logits_norm_std)

    def _logits(self, x, prev=None):
        """L = router(x) (+ gate_map @ prev), fp32 [T, E+Z]."""
        if self.router_weight is None:
            raise ValueError("router_logits: required by this layer, built without a router "
                             "weight (from_weights(router_weight=None)), got None")
        det = self.deterministic
        if self.router_hidden_weight is None:
            logits = compute_router_logits(x, self.router_weight, self.router_bias,
                                           self._router_parts(x.shape[0]), det)
        else:  # two-layer router, all in fp32
            hidden = self.xp.tanh(compute_router_logits(x, self.router_hidden_weight, None,
                                                        None, det))
            logits = compute_router_logits(hidden, self.router_weight, self.router_bias, None,
                                           det)
        if prev is not None:
            logits += compute_router_logits(prev, self.gate_map, None, None, det)
        return logits

    def _router_parts(self, tokens: int):
        """The router weight as three bf16 parts (routing.split_bf16) when bf16x3 applies,
        made once per router weight array; None otherwise."""
        if (self.router_gemm != "auto" or self.deterministic or self.device != "cuda"
                or self.config.dtype != "bfloat16" or tokens < BF16X3_MIN_TOKENS):
            return None
        cached = getattr(self, "_router_parts_cache", None)
        if cached is None or cached[0] is not self.router_weight:
            cached = (self.router_weight, split_bf16(self.router_weight))
            self._router_parts_cache = cached
        return cached[1]

    def __call__(self, x, router_logits=None, routing: RoutingResult | None = None, *,
                 prev_router_logits=None, return_router_logits: bool = False):
        """y [T, H] in x's dtype. ``router_logits``: [T, E+Z], any float dtype. ``routing``
        reuses a RoutingResult (from ``route``, or built by the caller: ids integer [T, K] in
        [0, E+Z), weights float [T, K]); no second routing pass. Its expert_counts are
        recomputed from the ids.

        ``prev_router_logits`` [T, E+Z] (layers with ``gating_residual``): the previous MoE
        layer's logits, as it returned them; None adds no residual term, and neither do given
        ``router_logits`` (they stand for the logits after the residual; docs/spec.md).
        ``return_router_logits=True`` returns (y, L): L fp32 [T, E+Z] the logits after the
        gating residual and before the normalization (what the next layer takes as
        ``prev_router_logits``); given ``router_logits`` are returned as L (in fp32, a new
        array: writing into it leaves the caller's logits alone).
        """
        x = self._input(x)
        T = x.shape[0]
        return_router_logits = check_bool("return_router_logits", return_router_logits)
        self._check_logit_sources(router_logits, prev_router_logits, routing)
        if routing is not None:
            if router_logits is not None:
                raise ValueError("routing, router_logits: pass one or the other, not both")
            if return_router_logits:
                raise ValueError("return_router_logits: a call with routing= computes no logits")
            routing = self._routing_input(routing, T)
        elif router_logits is not None:
            router_logits = self._logits_input(router_logits, T)
        prev = prev_router_logits
        if prev is not None:
            prev = self._logits_input(prev, T, "prev_router_logits")
        chunk = self.max_chunk_tokens
        if T <= chunk or self.group is not None:  # rank layers: one collective call
            y, logits = self._forward(x, router_logits, routing, prev=prev)
            if return_router_logits and router_logits is not None:
                logits = logits.copy()  # fp32 logits given come back as a new array, not theirs
            return (y, logits) if return_router_logits else y
        y = self.xp.empty(x.shape, x.dtype)  # chunks write into it: no concatenation
        logits = self.xp.empty((T, self.config.num_total_experts), np.float32) \
            if return_router_logits else None
        for s in range(0, T, chunk):
            sl = slice(s, min(T, s + chunk))
            sub_logits = None if router_logits is None else router_logits[sl]
            sub_routing = None
            if routing is not None:
                sub_routing = RoutingResult(routing.topk_ids[sl], routing.topk_weights[sl], None)
            y[sl], sub_l = self._forward(x[sl], sub_logits, sub_routing,
                                         prev=None if prev is None else prev[sl])
            if logits is not None:
                logits[sl] = sub_l
        return (y, logits) if return_router_logits else y

    def workspace_bytes(self, tokens: int | None = None) -> int:
        """Upper bound of the temporary memory one forward call takes (the output included),
        for unquantized layers (FP8 layers add their quantized activations and scales).

        Per chunk of up to ``max_chunk_tokens`` tokens: x in fp32 for the router GEMM (T, H),
        router logits (T, E+Z) fp32, and for every expert row, its gathered input (H), its
        GEMM 1 output (2I), activation (I) and output (H), the last two in fp32 for float16
        layers (and a 4-byte row scale); plus the output (T, H). Expert rows:
        one per real (token, slot) pair, at most T*K, plus the padding of the "padded"
        strategy: under PAD_ROWS rows per active expert, and "auto" pads only when the
        active experts average PADDED_MIN_ROWS rows or more, or to one uniform tile of at most
        UNIFORM_MAX_ROWS rows per active expert. The "capacity" strategy (bf16; "auto" where
        experts.capacity.prefers) holds (E + 1) blocks of C rows (capacity_rows) of
        input, GEMM 1 output and activation, E*C + T*K + C output rows, and the syncfree
        buffers of its spilled pairs (input and activation rows, at most T*K).
        """
        from .experts import PAD_ROWS, PADDED_MIN_ROWS, UNIFORM_MAX_ROWS, pairs_max
        from .experts.capacity import capacity_rows, prefers
        cfg = self.config
        if tokens is not None:
            tokens = check_int("tokens", tokens, minimum=0)
        T = self.max_chunk_tokens if tokens is None else min(tokens, self.max_chunk_tokens)
        item = np_dtype(cfg.dtype).itemsize
        pairs = T * cfg.top_k
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        padded_experts = {"auto": pairs // PADDED_MIN_ROWS, "padded": pairs, "fixed": pairs}.get(
            self.expert_strategy, 0)
        rows = pairs + min(E, padded_experts) * (PAD_ROWS - 1)
        if self.expert_strategy == "auto" and pairs > pairs_max(cfg.dtype, cfg.quantization):
            # the uniform tile
            rows = max(rows, min(E, pairs) * min(UNIFORM_MAX_ROWS, -(-pairs // 8) * 8))
        out_item = 4 if cfg.dtype == "float16" else item  # experts.rows_dtype
        experts = rows * ((H + 2 * I) * item + (H + I) * out_item
                          + (4 if cfg.dtype == "float16" else 0))
        if E and (self.expert_strategy == "capacity" or (
                self.expert_strategy == "auto" and cfg.dtype == "bfloat16"
                and prefers(T, cfg.top_k, E))):
            C = capacity_rows(T, cfg.top_k, E)
            # + index arrays: per expert about 24 int32 and the 6-pointer table, per pair 6
            # int32, and the pool's 512-byte rounding of about 16 small arrays
            experts = max(experts, ((E + 1) * C * (H + 3 * I) + (E * C + pairs + C) * H
                                    + pairs * (H + I)) * item
                          + (E + 1) * 144 + pairs * 24 + 16 * 512)
        per_chunk = T * (cfg.hidden_size + cfg.num_total_experts) * 4 + pairs * 12 + experts
        per_chunk += T * (cfg.router_hidden_size or 0) * 4  # the two-layer router's hidden
        if cfg.gating_residual:
            per_chunk += T * cfg.num_total_experts * 4  # the residual term
        if cfg.expert_input_scale != 1:
            per_chunk += T * cfg.hidden_size * item  # s * x
        total = tokens if tokens is not None else T
        return per_chunk + total * cfg.hidden_size * item

    def _forward(self, x, logits, routing, prev=None):
        if self.device == "cuda":
            cp = cupy_module()
            try:
                return self._forward_stages(x, logits, routing, prev)
            except cp.cuda.memory.OutOfMemoryError as exc:
                raise MemoryError(
                    f"ZeroExpertMoE forward ran out of GPU memory: a chunk of {x.shape[0]} "
                    f"tokens needs up to {self.workspace_bytes(x.shape[0]) / 2**20:.0f} MiB of "
                    f"workspace beyond the weights; lower max_chunk_tokens (now "
                    f"{self.max_chunk_tokens}) to bound it ({exc})") from exc
        return self._forward_stages(x, logits, routing, prev)

    def _forward_stages(self, x, logits, routing, prev=None):
        """(y, L): L the chunk's logits (None when routing was given)."""
        if routing is None:
            routing, logits = self._route(x, logits, prev)
        # The caller's routing comes without counts (_routing_input): the experts count the ids.
        if self.group is not None:
            from .parallel.exchange import ep_forward
            return ep_forward(self, scaled_input(x, self.config.expert_input_scale),
                              routing), logits
        return self._forward_routed(x, routing, routing.expert_counts,
                                    self.expert_strategy), logits

    def _forward_routed(self, x, routing, counts, strategy):
        """Steps 8-9 (experts, combine) for a routing result; ``counts``: its per-expert
        counts when valid, else None. graphs.py captures this with its own strategy."""
        cfg = self.config
        x = scaled_input(x, cfg.expert_input_scale)  # every expert reads s * x
        ids, weights = routing.topk_ids, routing.topk_weights
        experts = None
        if cfg.num_experts:
            scales = None if self.w13_scale_inv is None else (self.w13_scale_inv,
                                                              self.w2_scale_inv)
            experts = run_experts(x, ids, self.w13, self.w2, counts, strategy=strategy,
                                  scales=scales)
        return combine(x, ids, weights, cfg.num_experts, cfg.zero_types, experts,
                       self.const_vec, self.const_gate,
                       num_zero_experts=cfg.num_zero_experts, check_ids=False)

    def graphed(self, max_tokens: int | None = None, capture_sizes=None, *,
                router_logits: bool = False) -> "GraphedMoE":
        """This layer's forward captured as CUDA graphs, one per token count in
        ``capture_sizes`` (default: 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384,
        512, then steps of 256, up to and including ``max_tokens``; give ``max_tokens`` or
        ``capture_sizes``). ``g(x)`` replays the smallest size >= T; see graphs.GraphedMoE
        (and ``router_logits=True`` for graphs that take the caller's logits). GPU layers
        only."""
        from .graphs import GraphedMoE
        return GraphedMoE(self, max_tokens, capture_sizes, router_logits=router_logits)

    def warmup(self) -> None:
        """Compile every kernel this layer uses (one small forward), so timings exclude it."""
        x = self.xp.zeros((1, self.config.hidden_size), np_dtype(self.config.dtype))
        logits = None  # a layer without a router takes logits
        if self.router_weight is None:
            logits = self.xp.zeros((1, self.config.num_total_experts), np.float32)
        self(x, router_logits=logits)

    # Arrays a layer may hold, under from_weights' argument names; those beyond the first seven
    # exist only on layers whose options use them (FP8 scales, MoE++ routers).
    WEIGHT_NAMES = ("router_weight", "router_bias", "e_score_correction_bias", "w13", "w2",
                    "const_vec", "const_gate", "w13_scale_inv", "w2_scale_inv",
                    "router_hidden_weight", "gate_map")
    OPTION_NAMES = ("expert_strategy", "router_gemm", "deterministic", "max_chunk_tokens")

    def numpy_weights(self) -> dict[str, Any]:
        """The weights as host arrays, keyed by ``from_weights``' argument names, so that
        ``ZeroExpertMoE.from_weights(layer.config, **layer.numpy_weights())`` rebuilds the layer.

        Host copies on either device: writing into them leaves the layer unchanged. The first
        seven names are always present (None where the layer has no such array); the others
        only where the layer holds them.
        """
        return self._host_weights(copy=True)

    def _host_weights(self, copy: bool) -> dict[str, Any]:
        """numpy_weights(); ``copy=False`` returns a CPU layer's own arrays (pickling copies
        them anyway)."""
        def host(a):
            return None if a is None else a.get() if is_cupy(a) else a.copy() if copy else a
        out = {k: host(getattr(self, k, None)) for k in self.WEIGHT_NAMES}
        return {k: v for i, (k, v) in enumerate(out.items()) if i < 7 or v is not None}

    def _reference_weights(self) -> dict[str, Any]:
        """numpy_weights() for the float64 reference, except that a GPU layer's w13 / w2 come
        to the host one expert at a time, when the reference reads that expert (a checkpoint
        layer of tens of GB is never copied whole)."""
        out = {}
        for k in self.WEIGHT_NAMES:
            a = getattr(self, k, None)
            out[k] = (_ExpertsOnHost(a) if k in ("w13", "w2") and is_cupy(a)
                      else a.get() if is_cupy(a) else a)
        return out

    def options(self) -> dict[str, Any]:
        """The constructor's keyword options of this layer (what save / pickle keep)."""
        return {k: getattr(self, k) for k in self.OPTION_NAMES}

    # --- files and copies --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, layer: int, device: str = "auto", dtype: str | None = None,
                        **options) -> "ZeroExpertMoE":
        """Layer ``layer``'s MoE block (``model.layers.<layer>.mlp``) of a Hugging Face
        checkpoint directory: config.json (``MoEConfig.from_hf_config``) and
        ``model.safetensors`` or ``model.safetensors.index.json`` with its shards (or, without
        those, ``pytorch_model.bin`` / ``pytorch_model.bin.index.json``: torch pickle shards).

        Reads only that layer's tensors, and only the shards that hold them: the router
        (``router.classifier.weight`` [E+Z, H] as LongCat-Flash names it, or ``gate.weight``
        [E, H] as DeepSeek-V3 does; fp32 in the layer), the correction bias
        (``router.e_score_correction_bias`` / ``gate.e_score_correction_bias``), a router bias
        ``router.classifier.bias`` when the config's ``router_bias`` is true (required then, and
        added to the logits as docs/spec.md step 1 says; transformers' LongcatFlash leaves it
        out; with ``router_bias`` false or absent a bias tensor in the file is ignored), and the real experts 0..E-1 either per
        expert (``experts.M.gate_proj.weight`` [I, H], ``up_proj`` [I, H], ``down_proj`` [H, I];
        entries of the zero experts M >= E are ignored) or fused as transformers keeps them in
        memory (``experts.gate_up_proj`` [E or E+Z, 2I, H], gate rows first;
        ``experts.down_proj`` [E, H, I]). Shared experts (DeepSeek's ``shared_experts``) are
        not part of this layer: the caller adds their output. A zero expert of type "zero"
        outputs 0 here (transformers' LongcatFlash computes every zero expert as identity).
        MoE++ checkpoints (model type "MoE++") use their own names under
        ``model.layers.L.mlp.moe.`` (``checkpoint.moepp_targets``: the one- or two-layer router,
        ``gate_map``, ``experts.experts.M.up_proj`` [2I, H] / ``down_proj``, the constant
        experts' ``constant`` and ``wg``), and may be torch pickle shards
        (``pytorch_model.bin.index.json``): read memory-mapped with
        ``torch.load(weights_only=True)`` when torch is installed, else a
        ``checkpoint.TorchRequiredError`` (an ImportError and a ValueError) that shows how to
        convert them to safetensors.

        ``device``: "auto" (the GPU when one is usable), "cuda" or "cpu". On the GPU the
        weights are allocated there first and filled expert by expert: the host holds a few
        expert matrices at a time, never the layer. ``dtype``: None keeps the config's
        (``torch_dtype``), else the experts are cast to it. ``options``: the constructor's
        (expert_strategy, router_gemm, deterministic, max_chunk_tokens, group); with
        ``group=`` the rank reads only its real experts [r*E/R, (r+1)*E/R). A progress bar
        shows for layers over 1 GiB when stderr is a terminal. Nothing is written to ``path``.

        Raises FileNotFoundError naming a missing directory or file; ValueError for an unknown
        model type, a layer out of range or a dense layer; ValueError / TypeError naming the
        file and key for a missing tensor, a wrong shape or dtype, all before any weight
        memory is allocated.
        """
        _check_option_names("from_pretrained", options, _LAYER_OPTIONS + ("max_chunk_tokens",))
        device = resolve_device(device)
        group = options.get("group")
        if group is not None:  # a rank reads only its experts: check the group first
            _check_group(group, MoEConfig.from_hf_config(path))
        part = None if group is None else (group.rank, group.world_size)
        cfg, targets = checkpoint.pretrained_layer(path, layer, dtype, part)
        xp = cupy_module() if device == "cuda" else np
        arrays = checkpoint.fill_targets(targets, xp)
        if group is None:
            return cls.from_weights(cfg, **arrays, **options)
        # w13 / w2 are already the rank's slice, which from_weights (full tensors in) would cut
        # again: the arrays have the layer's dtypes and layout, so they go in as they are.
        weights = tuple(arrays.get(k) for k in cls.WEIGHT_NAMES[:7])  # the constructor's order
        scales = (arrays["w13_scale_inv"], arrays["w2_scale_inv"]) \
            if "w13_scale_inv" in arrays else None
        extra = (arrays.get("router_hidden_weight"), arrays.get("gate_map"))
        return cls(cfg, device=device, _weights=weights, _scales=scales, _router_extra=extra,
                   **options)

    def save(self, path) -> None:
        """Write the layer to one safetensors file: its arrays under from_weights' argument
        names, ``config.to_dict()`` and ``options()`` as JSON in the metadata. A GPU layer's
        arrays pass through the host one expert at a time. Read back with ``load``. Raises
        FileNotFoundError when the folder does not exist, IsADirectoryError when ``path`` is a
        directory, both naming the path."""
        self._whole_layer_only("save")
        arrays = {k: getattr(self, k, None) for k in self.WEIGHT_NAMES}
        checkpoint.save_layer(path, arrays, self.config, self.options())

    @classmethod
    def load(cls, path, device: str = "auto") -> "ZeroExpertMoE":
        """A layer written by ``save``, on ``device`` ("auto": the GPU when one is usable),
        with the config and options it was saved with. Raises FileNotFoundError naming the
        path; ValueError for a file ``save`` did not write (or of another format version) and
        ValueError / TypeError naming the file and key for a missing tensor, a wrong shape or
        dtype."""
        device = resolve_device(device)
        cfg, options, targets = checkpoint.load_layer(path)
        if not isinstance(options, dict) or not set(options) <= set(cls.OPTION_NAMES):
            raise ValueError(f"{os.fspath(path)}: metadata 'options': expected a JSON object "
                             f"with keys among {list(cls.OPTION_NAMES)}, got {options!r}")
        xp = cupy_module() if device == "cuda" else np
        arrays = {"router_weight": None,  # absent: a layer saved without a router
                  **checkpoint.fill_targets(targets, xp)}
        try:
            return cls.from_weights(cfg, **arrays, **options)
        except (TypeError, ValueError) as exc:  # arrays that do not fit together: name the file
            raise type(exc)(f"{os.fspath(path)}: {exc}") from exc

    def _whole_layer_only(self, what: str) -> None:
        if getattr(self, "group", None) is not None:
            raise TypeError(f"{what}: a rank layer (group=) holds only its experts and a "
                            f"communicator; gather the whole layer first "
                            f"(zm.parallel.gather_layer for local groups)")

    def __getstate__(self) -> dict[str, Any]:
        # Host arrays and plain values: the state of a GPU layer needs no GPU to be read.
        self._whole_layer_only("pickle / copy.deepcopy")
        return {"config": self.config.to_dict(), "device": self.device,
                "options": self.options(), "weights": self._host_weights(copy=False)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (and copy.deepcopy) rebuild the layer through from_weights, on the device
        it had; a GPU layer unpickled where no GPU is usable comes back on the CPU, with a
        RuntimeWarning. The new layer shares no memory with the original."""
        device = state["device"]
        weights = dict(state["weights"])
        if device == "cuda" and not gpu_available():
            import warnings
            warnings.warn("unpickling a GPU ZeroExpertMoE where no GPU is usable: the layer is "
                          "on the CPU (NumPy arrays)", RuntimeWarning, stacklevel=2)
            device = "cpu"
        if device == "cuda":
            cp = cupy_module()
            weights = {k: None if v is None else cp.asarray(v) for k, v in weights.items()}
        # On the CPU the arrays are already fresh: pickle makes new ones, deepcopy copies the state.
        new = type(self).from_weights(MoEConfig.from_dict(state["config"]), **weights,
                                      **state["options"])
        self.__dict__.update(new.__dict__)

    def reference(self, x, router_logits=None, routing=None, prev_router_logits=None):
        """The float64 evaluation of docs/spec.md for this layer's weights: (y, routing);
        ``routing.router_logits`` is L as ``return_router_logits`` gives it. Arguments as
        ``__call__`` takes them (``routing``: a RoutingResult or an (ids, weights) pair),
        checked as it checks them, except that router_logits and routing may be host arrays
        for a GPU layer; they enter the reference in their own dtypes."""
        from . import reference
        cfg = self.config
        if self.group is not None:
            raise ValueError("reference(): a rank layer holds only its experts; build the "
                             "whole layer (zm.parallel.gather_layer(rank_layers) for local "
                             "groups, or from_weights without group) and call its reference()")

        def to_host(a):  # routing may come as host arrays even for a GPU layer
            return a.get() if is_cupy(a) else np.asarray(a)
        x = self._input(x)
        T = x.shape[0]
        self._check_logit_sources(router_logits, prev_router_logits, routing)
        if routing is not None and router_logits is not None:
            raise ValueError("routing, router_logits: pass one or the other, not both")
        # Checked and rounded to fp32 as __call__ does (on any device): the layer's math takes
        # given logits as fp32 values (docs/spec.md), so its oracle does too.
        if router_logits is not None:
            router_logits = to_host(self._logits_input(router_logits, T, any_device=True))
        if prev_router_logits is not None:
            prev_router_logits = to_host(self._logits_input(
                prev_router_logits, T, "prev_router_logits", any_device=True))
        if routing is not None:
            if isinstance(routing, tuple) and not isinstance(routing, RoutingResult):
                if len(routing) != 2:
                    raise TypeError(f"routing: expected a RoutingResult or an (ids, weights) "
                                    f"pair, got a tuple of {len(routing)}")
                routing = RoutingResult(routing[0], routing[1], None)
            self._routing_input(routing, T, any_device=True)
            routing = (to_host(as_array(routing.topk_ids, "routing.topk_ids")),
                       to_host(as_array(routing.topk_weights, "routing.topk_weights")))
        w = self._reference_weights()
        return reference.forward(
            to_host(x), w["router_weight"], w["w13"], w["w2"], top_k=cfg.top_k,
            num_experts=cfg.num_experts, zero_expert_type=cfg.zero_types,
            scoring_func=cfg.scoring_func, correction_bias=w["e_score_correction_bias"],
            router_bias=w["router_bias"], renormalize=cfg.renormalize,
            routed_scaling_factor=cfg.routed_scaling_factor,
            num_expert_group=cfg.num_expert_group, topk_group=cfg.topk_group,
            const_vec=w["const_vec"], const_gate=w["const_gate"],
            router_logits=router_logits,
            w13_scale_inv=w["w13_scale_inv"], w2_scale_inv=w["w2_scale_inv"],
            routing=routing,
            expert_input_scale=cfg.expert_input_scale,
            router_hidden_weight=w["router_hidden_weight"], gate_map=w["gate_map"],
            prev_router_logits=prev_router_logits,
            router_logits_norm_std=cfg.router_logits_norm_std)

    @property
    def last_exchange(self):
        """ExchangeStats of the latest forward of a rank layer (rows and bytes sent and
        received over links); None without a group or before the first call."""
        return None if self._exchange is None else self._exchange.last_stats

    def __repr__(self) -> str:
        c = self.config
        ep = "" if self.group is None else f", rank={self.group.rank}/{self.group.world_size}"
        return (f"ZeroExpertMoE(H={c.hidden_size}, I={c.intermediate_size}, E={c.num_experts}, "
                f"Z={c.num_zero_experts}, K={c.top_k}, dtype={c.dtype}, "
                f"{'' if c.quantization is None else f'quantization={c.quantization!r}, '}"
                f"device={self.device!r}{ep})")


def _check_config(config) -> None:
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")


def _check_block_scales(name: str, scales) -> None:
    """FP8 block scales (scale_inv = max|W_block| / 448: finite, >= 0; docs/spec.md) or
    ValueError naming the first bad block: a NaN or infinite scale would turn its block's
    outputs into NaN or Inf, a negative one flip their sign, and no quantization makes
    either (a damaged checkpoint). One device synchronization on the GPU."""
    xp = cupy_module() if is_cupy(scales) else np
    bad = ~(xp.isfinite(scales) & (scales >= 0))
    if bool(bad.any()):
        at = tuple(int(i) for i in np.unravel_index(int(xp.argmax(bad)), scales.shape))
        raise ValueError(f"{name}: expected finite block scales >= 0, got "
                         f"{float(scales[at])} at block {at}")


# the constructor's keyword options that from_weights and from_pretrained pass through
_LAYER_OPTIONS = ("expert_strategy", "router_gemm", "deterministic", "group")


def _check_option_names(method: str, options: dict, allowed) -> None:
    """TypeError naming ``method`` (not the constructor it forwards to) for unknown keywords."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{method}: unexpected keyword argument(s) {unknown}; its options "
                        f"are {list(allowed)}")


def _checked_options(expert_strategy, router_gemm, deterministic, max_chunk_tokens) -> dict:
    """The constructor's options checked (ValueError / TypeError naming the option), in
    OPTION_NAMES' order; deterministic=True makes expert_strategy "fixed"."""
    max_chunk_tokens = check_int("max_chunk_tokens", max_chunk_tokens, 1)
    if expert_strategy not in STRATEGIES:
        raise ValueError(f"expert_strategy: expected one of {STRATEGIES}, "
                         f"got {expert_strategy!r}")
    if router_gemm not in ROUTER_GEMMS:
        raise ValueError(f"router_gemm: expected one of {ROUTER_GEMMS}, got {router_gemm!r}")
    deterministic = check_bool("deterministic", deterministic)
    if deterministic and (expert_strategy not in ("auto", "fixed") or router_gemm != "auto"):
        raise ValueError(f"deterministic=True picks its own kernels: expected "
                         f"expert_strategy='auto' or 'fixed' and router_gemm='auto', got "
                         f"{expert_strategy!r} and {router_gemm!r}")
    if deterministic:
        expert_strategy = "fixed"
    return {"expert_strategy": expert_strategy, "router_gemm": router_gemm,
            "deterministic": deterministic, "max_chunk_tokens": max_chunk_tokens}


def _check_group(group, config) -> None:
    """ValueError on every rank when the group size does not divide E (before any
    communication)."""
    if group is None:
        return
    if not (hasattr(group, "rank") and hasattr(group, "world_size")):
        raise TypeError(f"group: expected a zm.parallel group (with rank and world_size), "
                        f"got {type(group).__name__}")
    if config.num_experts % group.world_size:
        raise ValueError(f"group: the {group.world_size} ranks must divide the "
                         f"{config.num_experts} real experts evenly (num_experts % world_size "
                         f"== 0), got a remainder of {config.num_experts % group.world_size}")


def _expert_slice(group, E: int) -> tuple[int, int]:
    """The real experts [lo, hi) the rank holds (all of them without a group)."""
    if group is None:
        return 0, E
    per = E // group.world_size
    return group.rank * per, (group.rank + 1) * per


def _to_device(a, device: str):
    """a on ``device`` ("cuda": CuPy, "cpu": NumPy); a copy only where it lives elsewhere."""
    if a is None or is_cupy(a) == (device == "cuda"):
        return a
    return cupy_module().asarray(a) if device == "cuda" else a.get()


class WeightFormatError(TypeError, ValueError):
    """Expert weights whose format (e4m3 or not) does not match the config's quantization: a
    wrong dtype for that config, hence both a TypeError and a ValueError."""


def _float8_as_uint8(a, name: str):
    """A DLPack float8 tensor (e.g. torch.float8_e4m3fn, which neither NumPy's nor CuPy's
    DLPack import takes) as a uint8 view of its bits; other inputs unchanged. Other float8
    formats are refused."""
    dt = str(getattr(a, "dtype", ""))
    if isinstance(a, np.ndarray) or "float8" not in dt or is_cupy(a):
        return a
    if "e4m3fn" not in dt:
        raise TypeError(f"{name}: expected float8_e4m3fn weights, got {dt}")
    if not hasattr(a, "view"):
        raise TypeError(f"{name}: cannot take the bits of a {dt} tensor of "
                        f"{type(a).__name__}; pass a uint8 view")
    import torch  # the tensor is torch's: torch is loaded
    return a.view(torch.uint8)


def _check_router_arrays(cfg: MoEConfig, arrays: dict) -> None:
    """Which router arrays a config takes (from_weights); shapes are checked after."""
    has_router = arrays["router_weight"] is not None
    if arrays["router_hidden_weight"] is not None and cfg.router_hidden_size is None:
        raise ValueError("router_hidden_weight: the config has no two-layer router "
                         "(router_hidden_size=None), got an array")
    if has_router and cfg.router_hidden_size is not None and arrays["router_hidden_weight"] is None:
        raise ValueError(f"router_hidden_weight: required by router_hidden_size="
                         f"{cfg.router_hidden_size} (W1 [R, H]), got None")
    if arrays["gate_map"] is not None and not cfg.gating_residual:
        raise ValueError("gate_map: the config has no gating residual (gating_residual=False), "
                         "got an array")
    if has_router and cfg.gating_residual and arrays["gate_map"] is None:
        raise ValueError("gate_map: required by gating_residual=True ([E+Z, E+Z]), got None")
    if not has_router:
        for k in ("router_bias", "router_hidden_weight", "gate_map"):
            if arrays[k] is not None:
                raise ValueError(f"{k}: given without a router_weight")
