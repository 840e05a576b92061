"""Command line: `zeromoe info | demo | bench | launch` (also `python -m zeromoe_cupy`)."""
from __future__ import annotations

import argparse
import platform
import sys

import numpy as np

from . import __version__
from ._arrays import cupy_module, gpu_available, gpu_unavailable_reason

# Tolerances of docs/spec.md: ||y - ref|| / ||ref|| against the float64 reference.
TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 1e-2}


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
        return getattr(module, "__version__", "?")
    except Exception as exc:  # noqa: BLE001 - report, never fail `info`
        return f"not importable ({type(exc).__name__})"


def info() -> int:
    print(f"zeromoe_cupy {__version__}  Python {platform.python_version()}  "
          f"NumPy {np.__version__}")
    print(f"CuPy   {_version('cupy')}")
    print(f"Numba  {_version('numba')}  (numba-cuda {_version('numba_cuda')})")
    print(f"ml_dtypes {_version('ml_dtypes')}")
    cp = cupy_module()
    paths = ["NumPy (CPU)"]
    if gpu_available():
        rt = cp.cuda.runtime
        props = rt.getDeviceProperties(rt.getDevice())
        print(f"CUDA runtime {rt.runtimeGetVersion()}  driver {rt.driverGetVersion()}")
        print(f"GPU    {props['name'].decode()}  (sm_{props['major']}{props['minor']}, "
              f"{props['totalGlobalMem'] / 2**30:.1f} GiB)")
        from . import _cublas
        try:
            lib = _cublas.library()
            grouped = _cublas.has_grouped_gemm()
            print(f"cuBLAS {lib._name}  grouped GEMM: {grouped}")
            print("expert paths: pairs, padded (batched GEMM), "
                  + ("grouped" if grouped else "one GEMM per expert (no grouped GEMM)")
                  + ", fixed (deterministic=True), syncfree (CUDA graphs)")
        except Exception as exc:  # noqa: BLE001
            print(f"cuBLAS not loadable: {exc}")
        paths.append("CuPy + CUDA kernels (GPU)")
    else:
        print(f"GPU    none usable: {gpu_unavailable_reason()}")
        print("       only the NumPy path is available")
    print("paths: " + ", ".join(paths))
    return 0


def demo(device: str | None = None, tokens: int = 64) -> int:
    import zeromoe_cupy as zm

    device = device or ("cuda" if gpu_available() else "cpu")
    if device == "cpu":
        print("No GPU in use: running the NumPy path on the CPU.")
    ok = True
    for preset, dtype in (("tiny", "float32"), ("tiny", "bfloat16"), ("moe++-7b", "bfloat16")):
        overrides = {"dtype": dtype}
        if preset == "moe++-7b":
            overrides.update(hidden_size=256, intermediate_size=128)  # its routing, small sizes
        cfg = zm.MoEConfig.preset(preset, **overrides)
        layer = zm.ZeroExpertMoE(cfg, seed=0, device=device)
        err, real, passed = _check_layer(layer, tokens)
        ok &= passed
        label = f"{preset} (H, I shrunk)" if preset == "moe++-7b" else preset
        print(f"{label:22s} {dtype:9s} T={tokens} H={cfg.hidden_size} E={cfg.num_experts} "
              f"Z={cfg.num_zero_experts} K={cfg.top_k}: real experts/token {real:.2f}, "
              f"rel. error vs float64 {err:.2e} (<= {TOLERANCE[dtype]:.0e}) "
              f"{'ok' if passed else 'FAIL'}")
    print(f"demo on {device}: {'all checks passed' if ok else 'CHECK FAILED'}")
    return 0 if ok else 1


def _check_layer(layer, tokens: int):
    """Random tokens N(0, 1) through ``layer`` against its float64 reference: (relative
    error, real experts per token, whether the error is within the dtype's tolerance)."""
    import zeromoe_cupy as zm

    cfg = layer.config
    x_host = np.random.default_rng(1).standard_normal((tokens, cfg.hidden_size))
    x_host = x_host.astype(np.float32).astype(layer.dtype)
    x = cupy_module().asarray(x_host) if layer.device == "cuda" else x_host
    r = layer.route(x)
    y = layer(x, routing=r)
    ref, _ = layer.reference(x)
    err = zm.reference.relative_error(y.get() if layer.device == "cuda" else y, ref)
    ids = r.topk_ids.get() if layer.device == "cuda" else r.topk_ids
    real = float((ids < cfg.num_experts).sum(axis=1).mean())
    return err, real, err <= TOLERANCE[cfg.dtype]


def demo_checkpoint(moe, path: str, layer: int, tokens: int = 64) -> int:
    """The demo on a real layer ``moe`` (``model.layers.<layer>.mlp`` of the checkpoint at
    ``path``): random tokens N(0, 1), checked against the float64 reference."""
    device, cfg = moe.device, moe.config
    if device == "cpu":
        print("No GPU in use: running the NumPy path on the CPU.")
    err, real, passed = _check_layer(moe, tokens)
    print(f"{path} layer {layer}: {cfg.dtype} T={tokens} H={cfg.hidden_size} "
          f"I={cfg.intermediate_size} E={cfg.num_experts} Z={cfg.num_zero_experts} "
          f"K={cfg.top_k}: real experts/token {real:.2f}, rel. error vs float64 {err:.2e} "
          f"(<= {TOLERANCE[cfg.dtype]:.0e}) {'ok' if passed else 'FAIL'}")
    print(f"demo on {device}: {'all checks passed' if passed else 'CHECK FAILED'}")
    return 0 if passed else 1


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad arguments exit with status 2 and a one-line message (argparse)."""
    parser = argparse.ArgumentParser(prog="zeromoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, the GPU, and which paths are available")
    p_demo = sub.add_parser("demo", help="a small layer end to end, checked against float64")
    p_demo.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when a GPU is usable, else cpu")
    p_demo.add_argument("--tokens", type=positive_int, default=64)
    p_demo.add_argument("--checkpoint", metavar="PATH", default=None,
                        help="a Hugging Face checkpoint directory: run the demo on its layer")
    p_demo.add_argument("--layer", type=int, default=None,
                        help="with --checkpoint: the decoder layer whose MoE block is loaded")
    p_bench = sub.add_parser("bench", help="time the layer against the memory/FLOP floor")
    from .bench import add_arguments, check_arguments
    add_arguments(p_bench)
    p_launch = sub.add_parser("launch", help="run a script as N ranks on this host (one GPU "
                              "each), with the environment zm.parallel.init() reads")
    p_launch.add_argument("-n", "--nprocs", type=positive_int, required=True,
                          help="number of ranks")
    p_launch.add_argument("--no-prefix", action="store_true",
                          help="pass output through instead of prefixing lines with [rank r]")
    p_launch.add_argument("script", help="the Python script")
    p_launch.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    args = parser.parse_args(argv)
    if args.command == "launch":
        from .parallel.launch import launch
        try:
            return launch(args.nprocs, [args.script, *args.args], prefix=not args.no_prefix)
        except (ValueError, FileNotFoundError) as exc:  # more ranks than GPUs, no script:
            # one line, exit status 2
            p_launch.error(str(exc))
    if args.command == "info":
        return info()
    if args.command == "demo":
        if args.device == "cuda" and not gpu_available():
            p_demo.error(f"argument --device: cuda: no usable CUDA GPU "
                         f"({gpu_unavailable_reason()})")
        if (args.checkpoint is None) != (args.layer is None):
            p_demo.error("--checkpoint and --layer go together")
        if args.checkpoint is not None:
            import zeromoe_cupy as zm
            try:
                moe = zm.ZeroExpertMoE.from_pretrained(args.checkpoint, layer=args.layer,
                                                       device=args.device or "auto")
            except (FileNotFoundError, ValueError, TypeError, RuntimeError) as exc:
                p_demo.error(str(exc))
            return demo_checkpoint(moe, args.checkpoint, args.layer, args.tokens)
        return demo(args.device, args.tokens)
    check_arguments(p_bench, args)
    from .bench import run
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
