"""`zeromoe bench --ep N`: the expert-parallel layer on N ranks of this host against the
one-GPU layer at the same tokens per GPU and against docs/spec.md's per-rank floor, in one run.

The parent launches N worker processes (``zeromoe launch``); every rank builds the same random
whole layer (seed, zero-expert bias calibrated as in ``zeromoe bench``) and its rank layer as
a view of its experts, measures copy bandwidth, the gemm rate and the link bandwidth (an NCCL
all-to-all of large buffers: bytes sent + received per second, the quantity the floor divides),
then per tokens-per-rank size times the rank layer, its dispatch / experts / combine stages and
the one-GPU layer on the same tokens. Rank 0 prints the table (per-rank maxima) and writes
the JSON with every rank's figures.
"""
from __future__ import annotations

import json
import sys

import numpy as np

DEFAULT_TOKENS = (1, 128, 1024, 4096, 16384)
QUICK_TOKENS = (128, 4096, 16384)
LINK_BYTES = 256 << 20  # per peer


def run_ep(args) -> int:
    """The parent: start the ranks (each runs ``worker``)."""
    from .launch import launch
    argv = ["-m", "zeromoe_cupy", "bench", "--ep", str(args.ep), "--ep-worker",
            "--seed", str(args.seed), "--strategy", args.strategy]
    tokens = None if args.tokens is None else ",".join(map(str, args.tokens))
    for flag, value in (("--preset", args.preset), ("--tokens", tokens),
                        ("--dtype", args.dtype), ("--real-per-token", args.real_per_token),
                        ("--json", args.json)):
        if value is not None:
            argv += [flag, str(value)]
    if args.quick:
        argv.append("--quick")
    return launch(args.ep, argv)


def _ns(ms):
    return int(round(ms * 1e6))


def measure_link(group, timer) -> float:
    """Bytes sent + received per second by one rank in an all-to-all of LINK_BYTES per peer."""
    import cupy as cp
    R, me = group.world_size, group.rank
    if R == 1:
        return float("inf")
    splits = [0 if p == me else LINK_BYTES for p in range(R)]
    send = cp.ones(LINK_BYTES * (R - 1), np.uint8)
    recv = cp.empty_like(send)
    ms = timer(lambda _: group.all_to_all([send], splits, [recv], splits), [None])
    return 2 * LINK_BYTES * (R - 1) / (ms * 1e-3)


def worker(args) -> int:
    import cupy as cp

    import zeromoe_cupy as zm
    from ..bench import (_Timer, _normal, calibrate_zero_bias, floor_time, format_ceilings,
                         measure_ceilings)
    from .exchange import ep_forward

    group = zm.parallel.init()
    r, R = group.rank, group.world_size
    preset = args.preset or "longcat-flash"
    cfg = zm.MoEConfig.preset(preset, **({"dtype": args.dtype} if args.dtype else {}))
    tokens = list(args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS))
    real_per_token = args.real_per_token
    if real_per_token is None:
        real_per_token = 8.0 if preset == "longcat-flash" else cfg.top_k * 2 / 3
    say = print if r == 0 else (lambda *a, **k: None)
    say(f"building {preset} ({cfg.dtype}) on {R} ranks ...", flush=True)
    whole = zm.ZeroExpertMoE(cfg, seed=args.seed, expert_strategy=args.strategy)
    offset, share = calibrate_zero_bias(whole, real_per_token)
    part = zm.ZeroExpertMoE.from_weights(
        cfg, whole.router_weight, whole.w13, whole.w2, whole.e_score_correction_bias,
        whole.router_bias, whole.const_vec, whole.const_gate, expert_strategy=args.strategy,
        group=group)
    dt = whole.w13.dtype
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
    gpu = props["name"].decode()
    ceilings = measure_ceilings(cfg.dtype, args.quick)
    bandwidth, rate = ceilings["copy"]["best"], ceilings["matmul"]["best"]
    timer = _Timer(True, 3 if args.quick else 10, 10 if args.quick else 30)
    link = measure_link(group, _Timer(True, 2, 5))
    say(f"{gpu} x{R}:\n{format_ceilings(ceilings)}\nlink {link / 1e9:.0f} GB/s (sent + "
        f"received per rank, NCCL all-to-all of {LINK_BYTES >> 20} MiB per peer); zero-expert "
        f"bias {offset:+.4f}: {share:.2f} of {cfg.top_k} slots real", flush=True)
    whole.warmup()
    part.warmup()
    H, I = cfg.hidden_size, cfg.intermediate_size
    item = np.dtype(dt).itemsize
    rows = []
    for T in tokens:
        n_sets = int(min(16, max(2, (128 << 20) // max(1, T * H * 2))))
        xs = [_normal(cp, (T, H), dt, 100 + i + 1000 * r) for i in range(n_sets)]
        ep_ms = timer(part, xs)
        one_ms = timer(whole, xs)
        stages = _stage_times(part, xs, timer, ep_forward)
        # The floor's inputs on this rank, from one dispatch of xs[0] (collective).
        routing = part.route(xs[0])
        d = part._exchange.dispatch(xs[0], routing.topk_ids, routing.topk_weights)
        part._exchange.combine(cp.empty((d.x.shape[0], H), dt), d.handle)
        st = part.last_exchange
        local_ids = d.ids.get()
        pairs = int((local_ids >= 0).sum())
        distinct = np.unique(local_ids[local_ids >= 0]).size
        compute = max((distinct * 3 * H * I * item + 2 * T * H * item) / bandwidth,
                      (2 * T * H * cfg.num_total_experts + 6 * H * I * pairs) / rate)
        floor = compute + (st.bytes_sent + st.bytes_received) / link
        one_floor, _, _ = floor_time(cfg, routing.topk_ids.get(), bandwidth, rate)
        mine = [T, _ns(ep_ms), _ns(one_ms), _ns(floor * 1e3), _ns(one_floor * 1e3),
                _ns(stages["dispatch"]), _ns(stages["experts"]), _ns(stages["combine"]),
                st.rows_sent, st.rows_received, st.bytes_sent, st.bytes_received, pairs]
        allr = group.all_gather_counts(np.asarray(mine, np.int64))
        rows.append([dict(zip(_FIELDS, [int(v) for v in rank_row])) for rank_row in allr])
    result = {"preset": preset, "dtype": cfg.dtype, "ranks": R, "gpu": gpu,
              "copy_bandwidth_Bps": bandwidth, "matmul_flops": rate, "link_Bps": link,
              "ceilings": ceilings,
              "real_per_token": share, "strategy": args.strategy, "rows": rows}
    if r == 0:
        _print_table(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {args.json}")
    return 0


_FIELDS = ("tokens", "ep_ns", "one_gpu_ns", "floor_ns", "one_gpu_floor_ns", "dispatch_ns",
           "experts_ns", "combine_ns", "rows_sent", "rows_received", "bytes_sent",
           "bytes_received", "pairs_served")


def _stage_times(layer, xs, timer, ep_forward):
    """Median ms of dispatch (counts and rows, host sync included), the local experts and
    combine (rows back and the final sum), from CUDA events between the stages."""
    import cupy as cp
    samples = {"dispatch": [], "experts": [], "combine": []}
    for i in range(timer.warmup + timer.repeat):
        marks = []

        def mark(name, marks=marks):
            ev = cp.cuda.Event()
            ev.record()
            marks.append((name, ev))

        x = xs[i % len(xs)]
        routing = layer.route(x)
        mark("start")
        ep_forward(layer, x, routing, mark)
        if i < timer.warmup:
            continue
        marks[-1][1].synchronize()
        for (_, a), (name, b) in zip(marks, marks[1:]):
            samples[name].append(cp.cuda.get_elapsed_time(a, b))
    return {k: float(np.median(v)) for k, v in samples.items()}


def _print_table(result):
    R = result["ranks"]
    print(f"{result['preset']} {result['dtype']} on {R} x {result['gpu']}: per-rank figures are "
          f"the maximum over ranks; the one-GPU layer runs the same tokens per GPU")
    print(f"{'T/rank':>6} {'EP ms':>8} {'1-GPU ms':>8} {'EP/1GPU':>7} {'floor ms':>8} "
          f"{'EP/floor':>8} {'disp ms':>7} {'exp ms':>7} {'comb ms':>7} {'MB sent':>8} "
          f"{'MB recv':>8} {'rows sent':>9}")
    for per_rank in result["rows"]:
        def top(key):
            return max(row[key] for row in per_rank)
        ep, one, floor = top("ep_ns") / 1e6, top("one_gpu_ns") / 1e6, top("floor_ns") / 1e6
        print(f"{per_rank[0]['tokens']:>6} {ep:>8.3f} {one:>8.3f} {ep / one:>7.2f} "
              f"{floor:>8.3f} {ep / floor:>8.2f} {top('dispatch_ns') / 1e6:>7.3f} "
              f"{top('experts_ns') / 1e6:>7.3f} {top('combine_ns') / 1e6:>7.3f} "
              f"{top('bytes_sent') / 1e6:>8.1f} {top('bytes_received') / 1e6:>8.1f} "
              f"{top('rows_sent'):>9}")
    sys.stdout.flush()
