"""Checkpoint names and files -> the layer's arrays (no GPU code of its own: arrays are made
with the array module passed in, NumPy or CuPy).

Files are safetensors (https://github.com/huggingface/safetensors): an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}},
then the tensors' bytes. The few lines that read and write that format live here rather than
going through the ``safetensors`` package's NumPy API, because that API cannot read float8
tensors (FP8 checkpoints) and maps whole files into memory, while a layer of many GB should
pass through the host one expert at a time.

Shape legend as in layer.py: H hidden, I expert intermediate, E real experts, Z zero experts.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import struct
import sys
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from . import quant
from ._arrays import as_array, check_int, cupy_module, is_cupy, is_float_dtype, np_dtype

# Key names understood by state_dict_weights (after the prefix), the first found is used.
STATE_DICT_KEYS = {
    "router_weight": ("router.classifier.weight", "gate.weight", "router.weight"),
    "router_bias": ("router.classifier.bias", "gate.bias", "router.bias"),
    "e_score_correction_bias": ("router.e_score_correction_bias",
                                "gate.e_score_correction_bias", "e_score_correction_bias"),
    "w13": ("experts.w13_weight",),
    "w2": ("experts.w2_weight",),
    "const_vec": ("const_vec",),
    "const_gate": ("const_gate",),
}
PER_EXPERT_KEYS = {  # experts.{e}.<name>.weight; the first pair of names found is used
    "gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2"),
}


# gate[e], up[e]: (I, H); down[e]: (H, I) for e < E -> w13 (E, 2I, H), w2 (E, H, I)
def stack_expert_weights(config, gate, up, down):
    """Per-expert matrices stacked into the fused w13 (gate rows first) and w2, one copy.

    NumPy, CuPy or DLPack tensors, all on one device. Raises ValueError for a wrong count or
    shape, TypeError for mixed devices, a non-float matrix or a non-sequence.
    """
    E = config.num_experts
    for name, mats in (("gate", gate), ("up", up), ("down", down)):
        if not hasattr(mats, "__len__") or not hasattr(mats, "__getitem__"):
            raise TypeError(f"{name}: expected a sequence of {E} matrices (one per real "
                            f"expert), got {type(mats).__name__}")
        if len(mats) != E:
            raise ValueError(f"{name}: expected {E} matrices (one per real expert), "
                             f"got {len(mats)}")
    gate = [as_array(g, f"gate[{e}]") for e, g in enumerate(gate)]
    up = [as_array(u, f"up[{e}]") for e, u in enumerate(up)]
    down = [as_array(d, f"down[{e}]") for e, d in enumerate(down)]
    xp = cupy_module() if is_cupy(gate[0]) else np
    H, I = config.hidden_size, config.intermediate_size
    for name, mats, shape in (("gate", gate, (I, H)), ("up", up, (I, H)),
                              ("down", down, (H, I))):
        for e, a in enumerate(mats):
            if tuple(a.shape) != shape:
                raise ValueError(f"{name}[{e}]: expected shape {shape}, got {tuple(a.shape)}")
            if is_cupy(a) != (xp is not np):
                raise TypeError(f"{name}[{e}]: expected every matrix on one device")
            if not (is_float_dtype(a.dtype) or quant.is_e4m3(a)):  # else cast when stacked
                raise TypeError(f"{name}[{e}]: expected a floating-point matrix, got {a.dtype}")
    w13 = xp.stack([xp.concatenate([g, u], axis=0) for g, u in zip(gate, up)])
    w2 = xp.stack(down)
    return w13, w2


def state_dict_weights(config, state_dict, prefix: str = "") -> dict[str, Any]:
    """The keyword arguments of ``ZeroExpertMoE.from_weights`` found in a checkpoint's tensors.

    Keys, after ``prefix`` (e.g. "model.layers.0.mlp."): the router weight as
    ``router.classifier.weight`` (LongCat-Flash) or ``gate.weight``; its optional bias
    ``router.classifier.bias``; the selection bias ``router.e_score_correction_bias`` or
    ``gate.e_score_correction_bias``; experts either fused (``experts.w13_weight``
    [E, 2I, H], ``experts.w2_weight`` [E, H, I], as vLLM stores them) or per expert
    (``experts.{e}.gate_proj.weight`` / ``up_proj`` / ``down_proj``, or Mixtral's
    ``w1`` / ``w3`` / ``w2``); constant experts' ``const_vec`` and ``const_gate``.
    Raises TypeError when state_dict is not a mapping or prefix not a str; ValueError naming
    the keys looked for when the router or an expert is missing.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of name -> tensor (a dict, or "
                        f"safetensors' load_file result), got {type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix: expected a str, got {type(prefix).__name__} {prefix!r}")

    def find(names):
        for name in names:
            if prefix + name in state_dict:
                return state_dict[prefix + name]
        return None

    found = {k: find(names) for k, names in STATE_DICT_KEYS.items()}
    if found["router_weight"] is None:
        hint = ""
        if prefix and not prefix.endswith("."):
            hint = f"; prefix {prefix!r} has no trailing '.': did you mean {prefix + '.'!r}?"
        raise ValueError(f"state_dict: no router weight under {prefix!r} (looked for "
                         f"{[prefix + k for k in STATE_DICT_KEYS['router_weight']]}){hint}")
    out = {k: found[k] for k in ("router_weight", "e_score_correction_bias", "router_bias",
                                 "const_vec", "const_gate")}
    if found["w13"] is not None and found["w2"] is not None:
        return {**out, "w13": found["w13"], "w2": found["w2"]}
    mats = {}
    for role, names in PER_EXPERT_KEYS.items():
        for name in names:
            keys = [f"{prefix}experts.{e}.{name}.weight" for e in range(config.num_experts)]
            if all(k in state_dict for k in keys):
                mats[role] = [state_dict[k] for k in keys]
                break
        else:
            raise ValueError(f"state_dict: no {role} matrices for all "
                             f"{config.num_experts} experts under {prefix!r} (looked for "
                             f"experts.{{e}}.{names[0]}.weight and experts.{{e}}."
                             f"{names[1]}.weight, or fused experts.w13_weight/w2_weight)")
    w13, w2 = stack_expert_weights(config, mats["gate"], mats["up"], mats["down"])
    return {**out, "w13": w13, "w2": w2}


# --- the safetensors format -------------------------------------------------------------------
ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_E4M3 = quant.E4M3
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header
_READ_CHUNK = 1 << 30    # one read() moves at most this many bytes (Linux caps a read near 2 GiB)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are and what they hold."""

    path: str
    name: str
    dtype: str            # safetensors name: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int           # absolute byte offset of the data in the file
    nbytes: int
    # a tensor of a torch pickle (.bin shard), memory-mapped: its bytes come from here
    tensor: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def np_dtype(self) -> np.dtype | None:
        return ST_DTYPES.get(self.dtype)


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of a safetensors file (name -> TensorInfo) and its ``__metadata__``.

    Reads only the header. Raises FileNotFoundError naming the path, ValueError naming the
    path for a file that is not safetensors (bad length, JSON, or offsets past the end).
    """
    if os.path.isdir(path):  # still FileNotFoundError: no file at that path
        raise FileNotFoundError(f"{path}: a directory, expected a safetensors file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such safetensors file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header "
                             f"length)")
        n = struct.unpack("<Q", head)[0]
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n} for a file "
                             f"of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {exc})") \
                from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):  # safetensors: a JSON object of strings
        raise ValueError(f"{path}: not a safetensors file (__metadata__ is "
                         f"{type(meta).__name__}, expected a JSON object)")
    tensors = {}
    for name, e in header.items():
        try:
            dtype, shape = str(e["dtype"]), tuple(int(d) for d in e["shape"])
            begin, end = (int(o) for o in e["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: tensor {name!r}: malformed header entry {e!r}") from exc
        info = TensorInfo(path, name, dtype, shape, 8 + n + begin, end - begin)
        itemsize = ST_DTYPES[dtype].itemsize if dtype in ST_DTYPES else None
        if (not 0 <= begin <= end or 8 + n + end > size
                or (itemsize and int(np.prod(shape)) * itemsize != end - begin)):
            raise ValueError(f"{path}: tensor {name!r}: data_offsets {[begin, end]} do not fit "
                             f"its shape {list(shape)} / dtype {dtype} or the file size {size}")
        tensors[name] = info
    return tensors, meta


def read_into(info: TensorInfo, out: np.ndarray, index: int | None = None) -> np.ndarray:
    """Read a tensor (or its ``index``-th slice along axis 0) into the C-contiguous host
    array ``out`` of the tensor's dtype; returns ``out``. Thread-safe (positional reads)."""
    offset, nbytes = info.offset, info.nbytes
    if index is not None:
        nbytes //= info.shape[0]
        offset += index * nbytes
    if not out.flags.c_contiguous or out.nbytes != nbytes:  # pragma: no cover - callers' bug
        raise ValueError(f"{info.path}: tensor {info.name!r}: {nbytes} bytes into a buffer of "
                         f"{out.nbytes} bytes (C-contiguous: {out.flags.c_contiguous})")
    if info.tensor is not None:  # a .bin shard's tensor: copy from its memory map
        out.reshape(-1).view(np.uint8)[...] = _torch_bytes(info.tensor, index)
        return out
    buf = memoryview(out.reshape(-1).view(np.uint8))
    with open(info.path, "rb", buffering=0) as f:
        done = 0
        while done < nbytes:
            part = buf[done:done + _READ_CHUNK]
            if hasattr(os, "preadv"):
                got = os.preadv(f.fileno(), [part], offset + done)
            else:  # pragma: no cover - platforms without preadv; each call has its own file
                f.seek(offset + done)
                got = f.readinto(part)
            if not got:
                raise ValueError(f"{info.path}: tensor {info.name!r}: file ended early")
            done += got
    return out


def read_tensor(info: TensorInfo, index: int | None = None) -> np.ndarray:
    """A new host array with the tensor (or its ``index``-th slice along axis 0)."""
    shape = info.shape if index is None else info.shape[1:]
    return read_into(info, np.empty(shape, info.np_dtype), index)


def write_safetensors(path: str, tensors: dict[str, Any], metadata: dict[str, str],
                      e4m3_bits: tuple[str, ...] = ()) -> None:
    """Write NumPy or CuPy arrays (None values skipped) into one safetensors file.

    Tensors named in ``e4m3_bits`` that are uint8 hold float8_e4m3fn bits (how a GPU keeps
    e4m3 where CuPy has no such dtype) and are written as F8_E4M3. A CuPy array passes
    through the host one slice along axis 0 at a time. The file is written under a
    temporary name and renamed, so a failed save leaves no partial file.
    """
    tensors = {k: v for k, v in tensors.items() if v is not None}
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    pos = 0
    for name, a in tensors.items():
        dt = np.dtype(a.dtype)
        if dt not in _ST_NAMES:
            raise TypeError(f"{name}: dtype {dt} has no safetensors name")
        st_name = "F8_E4M3" if name in e4m3_bits and dt == np.uint8 else _ST_NAMES[dt]
        header[name] = {"dtype": st_name, "shape": list(a.shape),
                        "data_offsets": [pos, pos + a.size * dt.itemsize]}
        pos += a.size * dt.itemsize
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):  # else the error would name the temporary file
        raise FileNotFoundError(f"{path}: no such directory {folder}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, expected a file name")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for a in tensors.values():
                if is_cupy(a):
                    parts = (a[i].get() for i in range(a.shape[0])) if a.ndim > 1 else [a.get()]
                else:
                    parts = [a]
                for part in parts:
                    f.write(np.ascontiguousarray(part).reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --- torch pickles (.bin shards) ------------------------------------------------------------
# torch dtype name -> safetensors dtype name
TORCH_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                "float8_e4m3fn": "F8_E4M3", "int64": "I64", "int32": "I32", "int16": "I16",
                "int8": "I8", "uint8": "U8", "bool": "BOOL"}

# How to turn a directory of .bin shards into safetensors shards (torch and safetensors needed
# once, anywhere); shown when torch is missing here.
BIN_TO_SAFETENSORS = """\
import glob, json, os, torch, safetensors.torch
d, weight_map = "CHECKPOINT_DIR", {}
for f in sorted(glob.glob(os.path.join(d, "pytorch_model*.bin"))):
    sd = torch.load(f, map_location="cpu", weights_only=True)
    out = os.path.basename(f).replace("pytorch_model", "model")[:-4] + ".safetensors"
    safetensors.torch.save_file({k: v.contiguous().clone() for k, v in sd.items()},
                                os.path.join(d, out), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(sd, out))
with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)"""


class TorchRequiredError(ImportError, ValueError):
    """A .bin (torch pickle) checkpoint shard without torch installed: torch is missing (an
    ImportError), and the checkpoint is in a format this install cannot read (a ValueError)."""


def read_bin_header(path: str) -> dict[str, TensorInfo]:
    """The tensors of a torch pickle checkpoint shard (``pytorch_model*.bin``), name ->
    TensorInfo, read with ``torch.load(weights_only=True, mmap=True)``: the file is mapped,
    not read; a tensor's bytes are read when ``read_into`` copies it. Shards in torch's old
    (pre-zip) format cannot be mapped and are read whole.

    Raises FileNotFoundError naming the path; TorchRequiredError (an ImportError and a
    ValueError) when torch is not installed, with the few lines that convert the shards to
    safetensors; ValueError naming the path for a file that is not a torch state dict.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint shard")
    try:
        import torch  # optional: only .bin shards need it
    except ImportError as exc:
        raise TorchRequiredError(
            f"{path}: a torch pickle (.bin) checkpoint shard; reading it needs torch "
            f"(pip install torch). Or convert the checkpoint to safetensors once, where torch "
            f"and safetensors are installed (CHECKPOINT_DIR: the directory of the shards), "
            f"or load the model in transformers and call "
            f"save_pretrained(out_dir, safe_serialization=True):\n{BIN_TO_SAFETENSORS}") from exc
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler's errors vary by torch version
        raise ValueError(f"{path}: not a torch state dict that torch.load(weights_only=True) "
                         f"reads ({type(exc).__name__}: {exc})") from exc
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict of tensor name -> tensor, got "
                         f"{type(sd).__name__}")
    out = {}
    for name, t in sd.items():
        if isinstance(t, torch.Tensor):
            dtype = str(t.dtype).removeprefix("torch.")
            out[name] = TensorInfo(path, name, TORCH_DTYPES.get(dtype, dtype), tuple(t.shape),
                                   0, t.numel() * t.element_size(), t)
    return out


def _torch_bytes(t, index: int | None) -> np.ndarray:
    """The bytes of a torch CPU tensor (or of its ``index``-th slice along axis 0), uint8."""
    import torch
    if index is not None:
        t = t[index]
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


# --- a checkpoint's layer -> the layer's arrays -----------------------------------------------
@dataclasses.dataclass
class Target:
    """One array of the layer and where each of its pieces comes from in the files."""

    shape: tuple[int, ...]
    dtype: np.dtype
    # (tensor, slice index of the tensor along axis 0 or None, index into the target)
    pieces: list[tuple[TensorInfo, int | None, tuple]] = dataclasses.field(default_factory=list)
    zeros: bool = False   # allocated as zeros: the pieces fill only part of it


FUSED_EXPERT_KEYS = (  # (gate_up or w13 [E(+Z), 2I, H], down [E, H, I]), first pair found
    ("experts.gate_up_proj", "experts.down_proj"),   # transformers v5's in-memory layout
    ("experts.w13_weight", "experts.w2_weight"),     # vLLM's
)


class _Files:
    """Which file holds each tensor name; headers read on first use, each file at most once."""

    def __init__(self, where: dict[str, str], described_by: str):
        self.where, self.described_by = where, described_by
        self.headers: dict[str, dict[str, TensorInfo]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def info(self, key: str) -> TensorInfo:
        path = self.where[key]
        if path not in self.headers:
            self.headers[path] = (read_bin_header(path) if path.endswith(".bin")
                                  else read_header(path)[0])
        if key not in self.headers[path]:
            raise ValueError(f"{path}: no tensor {key!r} although {self.described_by} "
                             f"places it there")
        return self.headers[path][key]


def checkpoint_files(path: str) -> _Files:
    """The tensor -> file map of a checkpoint directory, from the first of
    ``model.safetensors.index.json`` (its weight_map; no shard is opened here),
    ``model.safetensors``, ``pytorch_model.bin.index.json`` (torch pickle shards, read
    through ``read_bin_header``; needs torch) and ``pytorch_model.bin`` found."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index, single = os.path.join(path, index), os.path.join(path, single)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                where = {k: os.path.join(path, v) for k, v in weight_map.items()}
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                    AttributeError) as exc:
                raise ValueError(f"{index}: expected a JSON object with a 'weight_map' of "
                                 f"tensor name -> shard file ({exc!r})") from exc
            return _Files(where, index)
        if os.path.isfile(single):
            tensors = (read_bin_header(single) if single.endswith(".bin")
                       else read_header(single)[0])
            files = _Files(dict.fromkeys(tensors, single), single)
            files.headers[single] = tensors
            return files
    raise FileNotFoundError(f"{path}: no model.safetensors.index.json, model.safetensors, "
                            f"pytorch_model.bin.index.json or pytorch_model.bin in the "
                            f"checkpoint directory")


def _check(info: TensorInfo, shape: tuple, allowed: tuple[str, ...], what: str) -> None:
    if info.shape != tuple(shape):
        raise ValueError(f"{info.path}: tensor {info.name!r} ({what}): expected shape "
                         f"{list(shape)}, got {list(info.shape)}")
    if info.dtype not in allowed:
        raise TypeError(f"{info.path}: tensor {info.name!r} ({what}): expected dtype one of "
                        f"{list(allowed)}, got {info.dtype}")


def pretrained_targets(files: _Files, prefix: str, config, dtype: np.dtype,
                       router_bias: bool | None = None,
                       experts: tuple[int, int] | None = None) -> dict[str, Target]:
    """The layer's arrays (from_weights' argument names) and the file pieces that fill them,
    every shape and dtype checked against the headers (no tensor data read).

    ``prefix``: "model.layers.L.mlp."; ``dtype``: the expert arrays' dtype. ``router_bias``:
    True requires ``router.classifier.bias``, False ignores it, None loads it if present.
    ``experts``: (lo, hi) to load only real experts lo..hi-1 (an expert-parallel rank's
    slice; w13 / w2 then have hi - lo rows); None: all E.
    Raises ValueError (missing key, wrong shape) / TypeError (wrong dtype) naming file and key.
    """
    cfg = config
    H, I, E, Z, N = (cfg.hidden_size, cfg.intermediate_size, cfg.num_experts,
                     cfg.num_zero_experts, cfg.num_total_experts)
    lo, hi = experts or (0, E)
    fp8 = getattr(cfg, "quantization", None) == "fp8"
    floats = ("F64", "F32", "F16", "BF16")
    expert_dtypes = ("F8_E4M3",) if fp8 else floats
    fp32 = np.dtype(np.float32)

    def find(role: str, required: bool = True) -> TensorInfo | None:
        names = STATE_DICT_KEYS[role]
        for name in names:
            if prefix + name in files:
                return files.info(prefix + name)
        if required:
            raise ValueError(f"{files.described_by}: no tensor {prefix + names[0]!r} ({role}; "
                             f"looked for {[prefix + n for n in names]})")
        return None

    out: dict[str, Target] = {}
    router = find("router_weight")
    _check(router, (N, H), floats, "router weight")
    out["router_weight"] = Target((N, H), fp32, [(router, None, ())])
    for role, wanted in (("e_score_correction_bias", cfg.use_correction_bias),
                         ("router_bias", router_bias)):
        info = find(role, required=bool(wanted))
        if info is not None and wanted is not False:
            _check(info, (N,), floats, role)
            out[role] = Target((N,), fp32, [(info, None, ())])
    w13 = out["w13"] = Target((hi - lo, 2 * I, H), dtype)
    w2 = out["w2"] = Target((hi - lo, H, I), dtype)
    if fp8:
        bi, bh = -(-I // 128), -(-H // 128)
        s13 = out["w13_scale_inv"] = Target((hi - lo, 2 * bi, bh), fp32)
        s2 = out["w2_scale_inv"] = Target((hi - lo, bh, bi), fp32)
    fused = next(((gu, d) for gu, d in FUSED_EXPERT_KEYS
                  if prefix + gu in files and prefix + d in files), None)
    if fused is not None:
        if fp8:
            raise ValueError(f"{files.described_by}: fused expert tensors "
                             f"{prefix + fused[0]!r} with quantization 'fp8': expected the "
                             f"per-expert layout (experts.M.gate_proj.weight + weight_scale_inv)")
        gate_up, down = files.info(prefix + fused[0]), files.info(prefix + fused[1])
        rows = gate_up.shape[0] if gate_up.shape and gate_up.shape[0] in (E, E + Z) else E
        _check(gate_up, (rows, 2 * I, H), expert_dtypes, "experts' gate and up, gate rows first")
        _check(down, (E, H, I), expert_dtypes, "experts' down projection")
        for e in range(lo, hi):
            w13.pieces.append((gate_up, e, (e - lo,)))
            w2.pieces.append((down, e, (e - lo,)))
        return out
    names = next((n for n in zip(*PER_EXPERT_KEYS.values())
                  if f"{prefix}experts.0.{n[0]}.weight" in files), None)
    if names is None:
        raise ValueError(f"{files.described_by}: no expert tensors under {prefix!r} (looked for "
                         f"{prefix}experts.0.gate_proj.weight, {prefix}experts.0.w1.weight, "
                         f"and the fused {[prefix + k for k, _ in FUSED_EXPERT_KEYS]})")
    gate_n, up_n, down_n = names
    for e in range(lo, hi):
        r = e - lo  # the expert's row in w13 / w2
        for name, target, shape, index, what in (
                (gate_n, w13, (I, H), (r, slice(0, I)), "gate projection"),
                (up_n, w13, (I, H), (r, slice(I, 2 * I)), "up projection"),
                (down_n, w2, (H, I), (r,), "down projection")):
            key = f"{prefix}experts.{e}.{name}.weight"
            if key not in files:
                raise ValueError(f"{files.described_by}: no tensor {key!r} (expert {e}'s "
                                 f"{what}; the layer has {E} real experts)")
            info = files.info(key)
            _check(info, shape, expert_dtypes, f"expert {e}'s {what}")
            target.pieces.append((info, None, index))
        if fp8:
            for name, target, shape, index in (
                    (gate_n, s13, (bi, bh), (r, slice(0, bi))),
                    (up_n, s13, (bi, bh), (r, slice(bi, 2 * bi))),
                    (down_n, s2, (bh, bi), (r,))):
                key = f"{prefix}experts.{e}.{name}.weight_scale_inv"
                if key not in files:
                    raise ValueError(f"{files.described_by}: no tensor {key!r} (expert {e}'s "
                                     f"fp8 block scales)")
                info = files.info(key)
                _check(info, shape, ("F32",), f"expert {e}'s fp8 block scales")
                target.pieces.append((info, None, index))
    return out


def moepp_targets(files: _Files, prefix: str, config, dtype: np.dtype,
                  experts: tuple[int, int] | None = None) -> dict[str, Target]:
    """``pretrained_targets`` for MoE++'s names (its modeling_moe_plus_plus.py: the decoder
    layer's ``mlp`` is a ``MOE`` module), under ``prefix`` "model.layers.L.mlp." + "moe.":
    ``gate.wg.weight`` [N, H] (router_weight), or with the two-layer router ``gate.wg.0.weight``
    [8N, H] (router_hidden_weight) and ``gate.wg.2.weight`` [N, 8N] (router_weight);
    ``gate.gate_map.weight`` [N, N] (gate_map); FFN experts e < E
    ``experts.experts.{e}.up_proj.weight`` [2I, H], gate rows first (w13[e]) and
    ``down_proj.weight`` [H, I] (w2[e]); constant experts E + j ``experts.experts.{E+j}.constant``
    [H] (const_vec[j]) and ``.wg.weight`` [2, H] (const_gate[j]). The copy and zero experts
    have no tensors: their const_vec / const_gate rows are zeros.
    Raises ValueError (missing key, wrong shape) / TypeError (wrong dtype) naming file and key.
    """
    cfg = config
    H, I, E, Z, N, R = (cfg.hidden_size, cfg.intermediate_size, cfg.num_experts,
                        cfg.num_zero_experts, cfg.num_total_experts, cfg.router_hidden_size)
    lo, hi = experts or (0, E)
    if getattr(cfg, "quantization", None) is not None:
        raise ValueError(f"{files.described_by}: quantization {cfg.quantization!r} with MoE++ "
                         f"names: expected unquantized experts (quantize the loaded layer "
                         f"with layer.quantize('fp8'))")
    prefix += "moe."
    fp32 = np.dtype(np.float32)

    def piece(name: str, shape: tuple, what: str, index: tuple = ()):
        key = prefix + name
        if key not in files:
            raise ValueError(f"{files.described_by}: no tensor {key!r} ({what})")
        info = files.info(key)
        _check(info, shape, ("F64", "F32", "F16", "BF16"), what)
        return info, None, index

    out: dict[str, Target] = {}
    if R is None:
        out["router_weight"] = Target((N, H), fp32, [piece(
            "gate.wg.weight", (N, H), "router weight; the config has moe_2layer_gate false")])
    else:
        out["router_hidden_weight"] = Target((R, H), fp32, [piece(
            "gate.wg.0.weight", (R, H), "router's first layer; the config has moe_2layer_gate "
                                        "true")])
        out["router_weight"] = Target((N, R), fp32, [piece(
            "gate.wg.2.weight", (N, R), "router's second layer")])
    out["gate_map"] = Target((N, N), fp32, [piece(
        "gate.gate_map.weight", (N, N), "gating residual map")])
    out["w13"] = Target((hi - lo, 2 * I, H), dtype, [piece(
        f"experts.experts.{e}.up_proj.weight", (2 * I, H),
        f"expert {e}'s gate and up projections, gate rows first", (e - lo,))
        for e in range(lo, hi)])
    out["w2"] = Target((hi - lo, H, I), dtype, [piece(
        f"experts.experts.{e}.down_proj.weight", (H, I), f"expert {e}'s down projection",
        (e - lo,)) for e in range(lo, hi)])
    constants = [j for j, t in enumerate(cfg.zero_types) if t == "constant"]
    out["const_vec"] = Target((Z, H), dtype, [piece(
        f"experts.experts.{E + j}.constant", (H,), f"constant expert {E + j}'s vector", (j,))
        for j in constants], zeros=True)
    out["const_gate"] = Target((Z, 2, H), dtype, [piece(
        f"experts.experts.{E + j}.wg.weight", (2, H), f"constant expert {E + j}'s gate", (j,))
        for j in constants], zeros=True)
    return out


def fill_targets(targets: dict[str, Target], xp, progress: bool | None = None,
                 workers: int = 4) -> dict[str, Any]:
    """Allocate each target with ``xp`` (NumPy or CuPy) and fill it piece by piece.

    Pieces are read in file order by ``workers`` threads, a few ahead of the copy, so the
    host holds only those few pieces (one expert matrix each) at a time; with NumPy and a
    matching dtype they are read straight into the target. ``progress``: a tqdm bar (None:
    when the pieces exceed 1 GiB and stderr is a terminal).
    """
    def alloc_dtype(dt):  # e4m3 on the GPU: a uint8 array of the bits (docs/spec.md "FP8 experts")
        return np.dtype(np.uint8) if xp is not np and dt == _E4M3 else dt
    arrays = {name: (xp.zeros if t.zeros else xp.empty)(t.shape, alloc_dtype(t.dtype))
              for name, t in targets.items()}
    jobs = sorted(((info.path, info.offset, name, info, index, dest)
                   for name, t in targets.items() for info, index, dest in t.pieces),
                  key=lambda j: (j[0], j[1]))
    total = sum(info.nbytes // (info.shape[0] if index is not None else 1)
                for _, _, _, info, index, _ in jobs)
    bar = None
    if progress or (progress is None and total > (1 << 30) and sys.stderr.isatty()):
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading layer")

    def read(job):
        _, _, name, info, index, dest = job
        target = arrays[name]
        if xp is np and target.dtype == info.np_dtype:
            view = target[dest] if dest else target
            if view.flags.c_contiguous:
                read_into(info, view, index)
                return None
        return read_tensor(info, index)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            window = 2 * workers
            futures = [pool.submit(read, j) for j in jobs[:window]]
            for i, job in enumerate(jobs):
                host = futures[i].result()
                futures[i] = None  # drop the finished piece
                if i + window < len(jobs):
                    futures.append(pool.submit(read, jobs[i + window]))
                _, _, name, info, index, dest = job
                if host is not None:
                    target = arrays[name]
                    if host.dtype == _E4M3 and target.dtype == np.uint8:
                        host = host.view(np.uint8)
                    if dest:
                        target[dest] = xp.asarray(host)
                    else:
                        target[...] = xp.asarray(host)
                if bar is not None:
                    bar.update(host.nbytes if host is not None
                               else info.nbytes // (info.shape[0] if index is not None else 1))
    finally:
        if bar is not None:
            bar.close()
    return arrays



def pretrained_layer(path, layer: int, dtype: str | None = None,
                     part: tuple[int, int] | None = None):
    """(config, targets) for ``model.layers.<layer>.mlp`` of a Hugging Face checkpoint
    directory: the config from its config.json (``MoEConfig.from_hf_config``; ``dtype``
    overrides its dtype), the targets as ``pretrained_targets`` (``moepp_targets`` for model
    type "MoE++") gives them. Reads config.json,
    the index and the headers of the shards that hold the layer's tensors; no tensor data.
    ``part``: (rank, world_size) of an expert-parallel rank, which loads real experts
    [rank*E/R, (rank+1)*E/R) only (ValueError when R does not divide E).

    Raises FileNotFoundError naming a missing directory or file; ValueError for a layer out
    of range or a dense (non-MoE) layer; ValueError / TypeError naming file and key for a
    missing tensor, a wrong shape or dtype.
    """
    from .config import DTYPES, parse_hf_config
    from ._arrays import np_dtype

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a checkpoint directory, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isfile(path):  # e.g. its config.json: say so rather than "no such directory"
        raise FileNotFoundError(f"{path}: a file, expected the checkpoint directory (the "
                                f"folder of config.json and the weights)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    model = parse_hf_config(path)
    cfg = model.config
    layer = check_int("layer", layer)
    if not 0 <= layer < model.num_layers:
        raise ValueError(f"layer: expected 0 <= layer < {model.num_layers} (the decoder layers "
                         f"of {path}), got {layer}")
    if layer in model.dense_layers:
        raise ValueError(f"layer: model.layers.{layer} of {path} is a dense MLP layer, not an "
                         f"MoE layer (the {model.model_type} config makes layers "
                         f"{list(model.dense_layers)} dense); the MoE layers are "
                         f"{[L for L in range(model.num_layers) if L not in model.dense_layers]}")
    if dtype is not None:
        if dtype not in DTYPES:
            raise TypeError(f"dtype: expected None (the checkpoint's) or one of {DTYPES}, "
                            f"got {dtype!r}")
        cfg = dataclasses.replace(cfg, dtype=dtype)
    experts = None
    if part is not None:
        rank, world = part
        if cfg.num_experts % world:
            raise ValueError(f"group: the {world} ranks must divide the {cfg.num_experts} real "
                             f"experts of {path}")
        per = cfg.num_experts // world
        experts = (rank * per, (rank + 1) * per)
    files = checkpoint_files(path)
    expert_dtype = _E4M3 if getattr(cfg, "quantization", None) == "fp8" else np_dtype(cfg.dtype)
    prefix = f"model.layers.{layer}.mlp."
    if model.model_type == "MoE++":
        return cfg, moepp_targets(files, prefix, cfg, expert_dtype, experts)
    targets = pretrained_targets(files, prefix, cfg, expert_dtype,
                                 router_bias=bool(model.router_bias),
                                 experts=experts)
    return cfg, targets


# --- the library's own file: one layer, config and options in the metadata --------------------
FORMAT_NAME = "zeromoe_cupy.layer"
FORMAT_VERSION = "1"


def layer_weight_specs(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, host dtype) of every array a whole layer of ``config`` may hold, under
    from_weights' argument names: fp32 for the router parts and the FP8 scales, e4m3
    (float8_e4m3fn) for FP8 experts, the config's dtype for the other expert arrays. The
    one statement of these rules (from_weights, weight assignment and ``load_layer`` use it)."""
    H, I, E, Z, N = (config.hidden_size, config.intermediate_size, config.num_experts,
                     config.num_zero_experts, config.num_total_experts)
    R = config.router_hidden_size
    f32, dt = np.dtype(np.float32), np_dtype(config.dtype)
    experts = _E4M3 if config.quantization == "fp8" else dt
    return {"router_weight": ((N, H) if R is None else (N, R), f32),
            "router_bias": ((N,), f32), "e_score_correction_bias": ((N,), f32),
            "w13": ((E, 2 * I, H), experts), "w2": ((E, H, I), experts),
            "const_vec": ((Z, H), dt), "const_gate": ((Z, 2, H), dt),
            "w13_scale_inv": (quant.scale_shape((E, 2 * I, H), glu=True), f32),
            "w2_scale_inv": (quant.scale_shape((E, H, I), glu=False), f32),
            "router_hidden_weight": ((R, H), f32), "gate_map": ((N, N), f32)}


def save_layer(path, arrays: dict[str, Any], config, options: dict[str, Any]) -> None:
    """One safetensors file: ``arrays`` under from_weights' argument names; the metadata holds
    the format name, ``config.to_dict()`` and ``options`` as JSON."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "config": json.dumps(config.to_dict()), "options": json.dumps(options)}
    write_safetensors(os.fspath(path), arrays, meta, e4m3_bits=("w13", "w2"))


def load_layer(path):
    """(config, options, targets) of a file written by ``save_layer``. Raises
    FileNotFoundError naming the path, ValueError for a file that is not one."""
    from .config import MoEConfig

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    path = os.fspath(path)
    tensors, meta = read_header(path)
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a layer saved by ZeroExpertMoE.save (metadata 'format' "
                         f"is {meta.get('format')!r}, expected {FORMAT_NAME!r}); for a Hugging "
                         f"Face checkpoint use ZeroExpertMoE.from_pretrained")
    try:
        cfg = MoEConfig.from_dict(json.loads(meta["config"]))
        options = json.loads(meta["options"])
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: metadata 'config' / 'options' unreadable ({exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: metadata 'format_version' is {meta.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION!r} (a file of another version of this "
                         f"library, or edited)")
    specs = layer_weight_specs(cfg)
    # What save writes for this config (a layer may be saved without a router: then none of
    # the router's parts); from_weights would make up a missing correction bias as zeros.
    router = "router_weight" in tensors
    required = {"w13": True, "w2": True, "w13_scale_inv": cfg.quantization == "fp8",
                "w2_scale_inv": cfg.quantization == "fp8",
                "const_vec": cfg.has_constant_experts, "const_gate": cfg.has_constant_experts,
                "e_score_correction_bias": cfg.use_correction_bias,
                "router_hidden_weight": router and cfg.router_hidden_size is not None,
                "gate_map": router and cfg.gating_residual}
    for name in (k for k, needed in required.items() if needed):
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r}: missing (required by the saved config)")
    targets = {}
    for name, info in tensors.items():
        if name not in specs:
            raise ValueError(f"{path}: tensor {name!r}: not a layer array (expected names "
                             f"among {list(specs)})")
        shape, dtype = specs[name]
        if info.shape != shape:
            raise ValueError(f"{path}: tensor {name!r}: expected shape {list(shape)} (the saved "
                             f"config's), got {list(info.shape)}")
        if info.np_dtype != dtype:
            raise TypeError(f"{path}: tensor {name!r}: expected dtype {_ST_NAMES[dtype]}, got "
                            f"{info.dtype}")
        targets[name] = Target(info.shape, info.np_dtype, [(info, None, ())])
    return cfg, options, targets
