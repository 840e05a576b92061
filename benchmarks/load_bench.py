"""Time ZeroExpertMoE.from_pretrained on one LongCat-Flash-sized layer.

Writes a checkpoint directory holding one MoE layer in the LongCat-Flash layout (config.json
of model_type longcat_flash, bf16 per-expert tensors experts.M.{gate,up,down}_proj.weight,
an fp32 router, shards of about 5 GB and model.safetensors.index.json), then loads that
layer in a fresh process (so its peak host memory is the load's own) and prints the time,
the read rate and the peak host RSS, first with the files evicted from the page cache
(posix_fadvise DONTNEED: a cold read, as close as a user process gets), then warm.
The loaded weights are spot-checked against what was written, and a 4-token forward against
the float64 reference.

    python benchmarks/load_bench.py DIR [--json OUT.json] [--keep]
    python benchmarks/load_bench.py DIR --experts 8 --hidden 256 --inter 128   # a small run

Default shapes: E = 512, Z = 256, H = 6144, I = 2048: 3 * 512 * 2048 * 6144 * 2 bytes =
38.7 GB of expert weights. The values are N(0, 1) * fan_in**-0.5 in bf16, taken at varying
offsets from a 64 Mi-value random pool (drawing 19 G fresh normals would take longer than
the load being measured).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time

import numpy as np

LAYER = 3
POOL = 1 << 26


def pools(H: int, I: int):
    import ml_dtypes
    rng = np.random.default_rng(12345)
    base = rng.standard_normal(POOL, dtype=np.float32)
    return ((base * np.float32(H ** -0.5)).astype(ml_dtypes.bfloat16),
            (base[::-1] * np.float32(I ** -0.5)).astype(ml_dtypes.bfloat16))


def tensor_values(pool, n: int, salt: int):
    """n values of a tensor, a slice of the pool at an offset fixed by salt."""
    off = (salt * 2654435761) % (len(pool) - n + 1)
    return pool[off:off + n]


def expert_tensors(E: int, H: int, I: int):
    """(name, shape, pool index, salt) of every expert tensor, in the order they are written."""
    p = f"model.layers.{LAYER}.mlp.experts"
    out = []
    for e in range(E):
        out.append((f"{p}.{e}.gate_proj.weight", (I, H), 0, 3 * e))
        out.append((f"{p}.{e}.up_proj.weight", (I, H), 0, 3 * e + 1))
        out.append((f"{p}.{e}.down_proj.weight", (H, I), 1, 3 * e + 2))
    return out


def write_checkpoint(d: str, E: int, Z: int, H: int, I: int, shard_bytes: int) -> dict:
    os.makedirs(d, exist_ok=True)
    config = dict(model_type="longcat_flash", architectures=["LongcatFlashForCausalLM"],
                  hidden_size=H, expert_ffn_hidden_size=I, n_routed_experts=E,
                  zero_expert_num=Z, zero_expert_type="identity", moe_topk=12,
                  routed_scaling_factor=6.0, router_bias=False, num_layers=28,
                  dtype="bfloat16")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    gate_pool, down_pool = pools(H, I)
    rng = np.random.default_rng(7)
    p = f"model.layers.{LAYER}.mlp"
    small = {f"{p}.router.classifier.weight":
             (rng.standard_normal((E + Z, H), dtype=np.float32) * H ** -0.5).astype(np.float32),
             f"{p}.router.e_score_correction_bias":
             np.concatenate([np.zeros(E, np.float32), np.full(Z, -0.002, np.float32)])}
    # Shards: the router in the first, experts filling each shard up to shard_bytes.
    shards, cur, size = [], [], 0
    for name, arr in small.items():
        cur.append((name, arr.shape, "F32", arr))
        size += arr.nbytes
    for name, shape, pool, salt in expert_tensors(E, H, I):
        nbytes = int(np.prod(shape)) * 2
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, "BF16", (pool, salt)))
        size += nbytes
    shards.append(cur)
    weight_map, total, t0 = {}, 0, time.perf_counter()
    for i, entries in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dt, _ in entries:
            n = int(np.prod(shape)) * (4 if dt == "F32" else 2)
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path = os.path.join(d, fname)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape, dt, src in entries:
                if dt == "F32":
                    a = src
                else:
                    pool, salt = src
                    a = tensor_values(gate_pool if pool == 0 else down_pool,
                                      int(np.prod(shape)), salt)
                f.write(np.ascontiguousarray(a).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        total += pos
        print(f"  wrote {fname}: {pos / 1e9:.2f} GB", flush=True)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return {"shards": len(shards), "bytes": total, "write_s": time.perf_counter() - t0}


def evict(d: str) -> bool:
    """Drop the directory's files from the page cache (clean pages only; no root needed)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for name in os.listdir(d):
        fd = os.open(os.path.join(d, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def load_once(d: str, check: bool) -> dict:
    """Runs in its own process: time from_pretrained, report peak host RSS."""
    import zeromoe_cupy as zm
    from zeromoe_cupy._arrays import gpu_available
    res = {"device": "cuda" if gpu_available() else "cpu"}
    if res["device"] == "cuda":
        import cupy as cp
        cp.zeros(1)  # the CUDA context exists before timing
        res["gpu"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    layer = zm.ZeroExpertMoE.from_pretrained(d, layer=LAYER)
    if res["device"] == "cuda":
        cp.cuda.Device().synchronize()
    res["load_s"] = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res["peak_rss_MiB"] = rss1 / 1024          # ru_maxrss is in KiB on Linux
    res["rss_before_load_MiB"] = rss0 / 1024
    nbytes = layer.w13.nbytes + layer.w2.nbytes
    res["expert_GB"] = nbytes / 1e9
    res["GB_per_s"] = nbytes / 1e9 / res["load_s"]
    if check:
        cfg = layer.config
        H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        gate_pool, down_pool = pools(H, I)
        host = (lambda a: a.get()) if res["device"] == "cuda" else (lambda a: a)
        bad = []
        for e in sorted({0, 1, E // 2, E - 1}):
            for part, want in (
                    (host(layer.w13[e, :I]), tensor_values(gate_pool, I * H, 3 * e)),
                    (host(layer.w13[e, I:]), tensor_values(gate_pool, I * H, 3 * e + 1)),
                    (host(layer.w2[e]), tensor_values(down_pool, I * H, 3 * e + 2))):
                if not np.array_equal(part.reshape(-1).view(np.uint16), want.view(np.uint16)):
                    bad.append(e)
        res["spot_check"] = "ok" if not bad else f"MISMATCH in experts {sorted(set(bad))}"
        x = np.random.default_rng(1).standard_normal((4, H)).astype(np.float32)
        x = x.astype(layer.w13.dtype)
        xd = layer.xp.asarray(x)
        y = host(layer(xd))
        ref, _ = layer.reference(xd)
        res["forward_rel_err_vs_float64"] = float(zm.reference.relative_error(y, ref))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="where to write the checkpoint (needs ~39 GB free)")
    ap.add_argument("--experts", type=int, default=512)
    ap.add_argument("--zero", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=6144)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--no-check", action="store_true", help="skip spot check and forward")
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_only:
        print("RESULT " + json.dumps(load_once(args.dir, not args.no_check)), flush=True)
        return 0

    results: dict = {"shape": dict(E=args.experts, Z=args.zero, H=args.hidden, I=args.inter)}

    def save():
        print(json.dumps(results, indent=1), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    need = 3 * args.experts * args.hidden * args.inter * 2
    parent = os.path.dirname(os.path.abspath(args.dir)) or "."
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need * 1.05:
        results["error"] = f"{parent}: {free / 1e9:.1f} GB free, the layer needs {need / 1e9:.1f}"
        save()
        return 1
    rc = 0
    try:
        print(f"writing {need / 1e9:.1f} GB into {args.dir} ...", flush=True)
        results["write"] = write_checkpoint(args.dir, args.experts, args.zero, args.hidden,
                                            args.inter, int(args.shard_gb * 1e9))
        save()
        for run in ("cold", "warm"):
            if run == "cold":
                results["evicted"] = evict(args.dir)
            cmd = [sys.executable, os.path.abspath(__file__), args.dir, "--load-only"]
            if args.no_check or run == "warm":
                cmd.append("--no-check")
            p = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not lines:
                results[run] = {"error": f"exit {p.returncode}", "stderr": p.stderr[-3000:]}
                rc = 1
            else:
                results[run] = json.loads(lines[-1][7:])
            save()
    except Exception as exc:  # noqa: BLE001 - runs once: record what happened
        results["error"] = f"{type(exc).__name__}: {exc}"
        save()
        rc = 1
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
