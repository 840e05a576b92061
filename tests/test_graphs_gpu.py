"""CUDA-graph replay (graphs.py) and the sync-free expert path (experts/syncfree.py).

GPU tests carry the gpu marker (deselected without a GPU); the size rules and the errors that
need no GPU run everywhere."""
import dataclasses
import types

import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy import graphs
from zeromoe_cupy.experts import PAIRS_MAX, PAIRS_MAX_BF16_FP8
from zeromoe_cupy.reference import relative_error

from conftest import TOL
from helpers import random_layer_weights, random_x


# --- no GPU needed ------------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens,expected", [
    (1, (1,)), (3, (1, 2, 3)), (16, (1, 2, 4, 8, 16)),
    (1000, (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1000)),
    (1024, (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024))])
def test_default_capture_sizes(max_tokens, expected):
    assert graphs.default_capture_sizes(max_tokens) == expected


@pytest.mark.parametrize("kw,err", [
    (dict(), ValueError), (dict(max_tokens=0), ValueError), (dict(max_tokens=2.0), TypeError),
    (dict(max_tokens=True), TypeError), (dict(capture_sizes=()), ValueError),
    (dict(capture_sizes=(1, -2)), ValueError), (dict(capture_sizes=5), TypeError),
    (dict(capture_sizes=(1, 2.0)), TypeError),
    (dict(max_tokens=8, capture_sizes=(1, 4)), ValueError)])
def test_capture_size_arguments_rejected(kw, err):
    with pytest.raises(err):
        graphs._sizes(kw.get("max_tokens"), kw.get("capture_sizes"))


@pytest.mark.parametrize("strategy,tokens,expected", [
    ("auto", PAIRS_MAX_BF16_FP8 // 4, "pairs"), ("auto", PAIRS_MAX // 4, "pairs"),
    ("auto", PAIRS_MAX // 4 + 1, "syncfree"),
    ("grouped", 1, "pairs"), ("padded", 1000, "syncfree"), ("fixed", 1, "fixed"),
    ("syncfree", 1, "syncfree"), ("pairs", 1000, "pairs"), ("pairs", 20000, "syncfree"),
    ("capacity", 1, "capacity"), ("auto", 300, "syncfree")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_strategy_is_sync_free(strategy, tokens, expected, dtype):
    # 64 real experts, top-4: "capacity" (bf16 only) from 13 pairs per expert, 208 tokens
    cfg = dataclasses.replace(zm.MoEConfig.preset("tiny"), top_k=4, num_experts=64,
                              dtype=dtype)
    layer = zm.ZeroExpertMoE(cfg, device="cpu", expert_strategy=strategy)
    if dtype == "bfloat16" and expected == "pairs" and strategy != "pairs" \
            and tokens * 4 > PAIRS_MAX_BF16_FP8:  # bf16: the pair kernels to 128 pairs
        expected = "syncfree"
    if dtype == "bfloat16" and expected == "syncfree" and tokens * 4 >= 13 * 64 \
            and tokens * 4 / 64 + 3 * (tokens * 4 / 64) ** 0.5 + 4 <= 64:
        # from 13 pairs per expert while C = T*K/E + 3 sqrt(T*K/E) + 4 (rounded up to 8) <= 64:
        # 208 to 632 tokens; not 81 (5 pairs per expert), 1000 (C = 96) nor 20000
        expected = "capacity"
    assert graphs.graph_strategy(layer, tokens) == expected


@pytest.mark.parametrize("strategy", ["auto", "grouped", "padded"])
@pytest.mark.parametrize("dtype,quantization", [("bfloat16", "fp8"), ("float16", "fp8"),
                                                ("float32", "fp8"), ("bfloat16", None)])
def test_graph_strategy_of_bf16_and_fp8_layers(strategy, dtype, quantization):
    # the pair kernels to PAIRS_MAX_BF16_FP8 (token, slot) pairs, then the sync-free ones (512
    # experts: "capacity", bf16 without quantization, only from 1664 tokens); fp16 and fp32
    # layers without quantization keep the pair kernels to PAIRS_MAX
    cfg = dataclasses.replace(zm.MoEConfig.preset("tiny"), top_k=4, num_experts=512,
                              dtype=dtype, quantization=quantization)
    # (the rule reads the config and the strategy alone: no 512 experts' weights built)
    layer = types.SimpleNamespace(config=cfg, expert_strategy=strategy)
    most = PAIRS_MAX_BF16_FP8 // 4
    assert PAIRS_MAX // 4 > most + 1
    assert graphs.graph_strategy(layer, 1) == "pairs"
    assert graphs.graph_strategy(layer, most) == "pairs"
    assert graphs.graph_strategy(layer, most + 1) == "syncfree"
    assert graphs.graph_strategy(layer, PAIRS_MAX // 4) == "syncfree"
    for dtype in ("float16", "float32"):
        other = types.SimpleNamespace(
            config=dataclasses.replace(cfg, dtype=dtype, quantization=None),
            expert_strategy=strategy)
        assert graphs.graph_strategy(other, PAIRS_MAX // 4) == "pairs"
        assert graphs.graph_strategy(other, PAIRS_MAX // 4 + 1) == "syncfree"


@pytest.mark.parametrize("T,K,E,C", [(1024, 12, 512, 48), (256, 12, 512, 24), (1, 1, 512, 8),
                                     (300, 4, 16, 112)])
def test_capacity_rows(T, K, E, C):
    # T*K/E + 3 sqrt(T*K/E) + 4, rounded up to a multiple of 8
    from zeromoe_cupy.experts.capacity import capacity_rows
    assert capacity_rows(T, K, E) == C


@pytest.mark.parametrize("T,expected", [(554, False), (555, True), (1742, True), (1743, False)])
def test_capacity_from_13_pairs_per_expert_while_c_is_at_most_64(T, expected):
    # top-12 of 512 real experts: 13 pairs per expert from 555 tokens (6660 >= 6656 pairs)
    from zeromoe_cupy.experts.capacity import capacity_rows, prefers
    assert prefers(T, 12, 512) == expected
    assert capacity_rows(1742, 12, 512) == 64 and capacity_rows(1743, 12, 512) == 72
    assert not prefers(100, 4, 0)  # no real experts: never (and no division by zero)


def test_graphed_cpu_layer_names_its_device():
    layer = zm.ZeroExpertMoE(zm.MoEConfig.preset("tiny"), device="cpu")
    with pytest.raises(ValueError, match="'cpu'"):
        layer.graphed(max_tokens=4)


def test_graphed_rejects_other_objects():
    with pytest.raises(TypeError, match="ZeroExpertMoE"):
        graphs.GraphedMoE(object(), max_tokens=4)


# --- GPU ---------------------------------------------------------------------------------------
def _gpu_layer(rng, cfg, **options):
    cp = pytest.importorskip("cupy")
    w = random_layer_weights(rng, cfg, bias_scale=0.02)
    return zm.ZeroExpertMoE.from_weights(cfg, **{k: cp.asarray(v) for k, v in w.items()},
                                         **options)


def _padded(x, size):
    import cupy as cp
    xp = cp.zeros((size, x.shape[1]), x.dtype)
    xp[:x.shape[0]] = x
    return xp


SYNCFREE_CASES = {
    # name: (config, T). H, I multiples of 8 take the tensor cores; N not a multiple of the
    # kernels' feature chunks; "odd" (H % 8 != 0) and fp32 take the "fixed" fallback.
    "small": (zm.MoEConfig(hidden_size=200, intermediate_size=72, num_experts=12,
                           num_zero_experts=4, top_k=4, use_correction_bias=True), 50),
    "many_rows": (zm.MoEConfig(hidden_size=256, intermediate_size=128, num_experts=3,
                               num_zero_experts=2, top_k=2), 300),
    "odd": (zm.MoEConfig(hidden_size=257, intermediate_size=40, num_experts=5,
                         num_zero_experts=3, top_k=3,
                         zero_expert_type=("identity", "zero", "constant")), 21),
    "t1": (zm.MoEConfig.preset("tiny"), 1),
    "t0": (zm.MoEConfig.preset("tiny"), 0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["syncfree", "capacity"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("case", sorted(SYNCFREE_CASES))
def test_syncfree_path_matches_reference(case, dtype, strategy, rng):
    cp = pytest.importorskip("cupy")
    cfg0, T = SYNCFREE_CASES[case]
    cfg = dataclasses.replace(cfg0, dtype=dtype)
    layer = _gpu_layer(rng, cfg, expert_strategy=strategy)
    x = cp.asarray(random_x(rng, T, cfg.hidden_size, dtype))
    x_before = x.copy()
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    cp.testing.assert_array_equal(x, x_before)
    if T:
        ref, _ = layer.reference(x)
        assert relative_error(y.get(), ref) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["syncfree_gemm", "stream2"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", ["small", "many_rows", "t1", "skewed"])
def test_syncfree_kernels_match_reference(case, dtype, kernel, rng, monkeypatch):
    """Both GEMM kernels of the syncfree path whatever the rows per expert: syncfree_gemm and
    syncfree_stream with 2 tiles of 8 rows per pass (experts of 1 to 300 rows: tiles cut
    short, many passes; N not a multiple of 16)."""
    cp = pytest.importorskip("cupy")
    from zeromoe_cupy.experts import syncfree
    tiles = int(kernel[-1]) if kernel.startswith("stream") else 0
    monkeypatch.setattr(syncfree, "STREAM_PAIRS_PER_EXPERT", ((10**9, tiles),) if tiles else ())
    cfg0, T = (SYNCFREE_CASES["small"][0], 300) if case == "skewed" else SYNCFREE_CASES[case]
    cfg = dataclasses.replace(cfg0, dtype=dtype)
    layer = _gpu_layer(rng, cfg, expert_strategy="syncfree")
    if case == "skewed":  # one expert takes every token (300 rows)
        layer.e_score_correction_bias[1] += 10
    x = cp.asarray(random_x(rng, T, cfg.hidden_size, dtype))
    ref, _ = layer.reference(x)
    assert relative_error(layer(x).get(), ref) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["syncfree", "capacity"])
@pytest.mark.parametrize("force", ["zero", "one", "single_active"])
def test_syncfree_path_skewed_routing(force, strategy, rng):
    # "capacity": an expert's block holds capacity_rows(300, 4, 16) = 112 rows; the rest of a
    # hot expert's rows spill to the syncfree path
    cp = pytest.importorskip("cupy")
    cfg = zm.MoEConfig(hidden_size=256, intermediate_size=128, num_experts=16,
                       num_zero_experts=8, top_k=4, use_correction_bias=True, dtype="bfloat16")
    layer = _gpu_layer(rng, cfg, expert_strategy=strategy)
    bias = layer.e_score_correction_bias
    if force == "zero":
        bias[16:] += 10
    elif force == "one":  # one expert gets all 300 tokens: ten passes of 32 rows
        bias[3] += 10
    else:
        bias[5] += 10
        bias[16:] += 5
    x = cp.asarray(random_x(rng, 300, 256, "bfloat16"))
    ref, _ = layer.reference(x)
    assert relative_error(layer(x).get(), ref) <= TOL["bfloat16"]


GRAPH_CFG = zm.MoEConfig(hidden_size=256, intermediate_size=128, num_experts=40,
                         num_zero_experts=8, top_k=6, use_correction_bias=True,
                         dtype="bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["syncfree", "pairs", "capacity"])
def test_replay_equals_eager_of_padded_input_bitwise(strategy, rng):
    # The layer runs the graph's own expert path eagerly: every real row's bits must match,
    # at every captured size, for T = size and T < size, with new x (new routing) each call.
    cp = pytest.importorskip("cupy")
    layer = _gpu_layer(rng, GRAPH_CFG, expert_strategy=strategy)
    g = layer.graphed(max_tokens=72)
    assert g.capture_sizes == (1, 2, 4, 8, 16, 24, 32, 48, 64, 72)
    H = GRAPH_CFG.hidden_size
    previous = None
    for size in g.capture_sizes:
        for T in sorted({size, max(1, size - 3)}):
            x = cp.asarray(random_x(rng, T, H, "bfloat16"))
            y = g(x)
            assert isinstance(y, cp.ndarray) and y.shape == (T, H) and y.dtype == x.dtype
            cp.testing.assert_array_equal(y, layer(_padded(x, size))[:T])
            if previous is not None and previous.shape == y.shape:
                assert not bool((previous == y).all())  # the replay saw the new x
            previous = y
    # returned arrays are new: a later replay does not change them
    x = cp.asarray(random_x(rng, 5, H, "bfloat16"))
    y = g(x)
    kept = y.copy()
    g(cp.asarray(random_x(rng, 5, H, "bfloat16")))
    cp.testing.assert_array_equal(y, kept)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_eager_auto_takes_the_graph_path(quantization, rng):
    # bf16 and fp8 layers take the pair kernels up to PAIRS_MAX_BF16_FP8 (token, slot) pairs
    # eagerly as in a graph, then the sync-free ones: on both sides of the bound the replay
    # equals the eager call bit for bit (the two paths' sums differ in order)
    cp = pytest.importorskip("cupy")
    layer = _gpu_layer(rng, GRAPH_CFG)
    if quantization is not None:
        layer = layer.quantize(quantization)
    most = PAIRS_MAX_BF16_FP8 // GRAPH_CFG.top_k
    sizes = (most, most + 3)  # 126 and 144 pairs (40 experts: 3.6 per expert, no capacity)
    assert [graphs.graph_strategy(layer, T) for T in sizes] == ["pairs", "syncfree"]
    g = layer.graphed(capture_sizes=sizes)
    for T in sizes:
        x = cp.asarray(random_x(rng, T, GRAPH_CFG.hidden_size, "bfloat16"))
        cp.testing.assert_array_equal(g(x), layer(x))


@pytest.mark.gpu
def test_replay_masks_the_padding_rows_of_each_call(rng):
    # n_valid (the rows that are not padding) is copied only when it changes: after any
    # sequence of token counts the graph's count is this call's, and each call's result is the
    # eager one of its padded input
    cp = pytest.importorskip("cupy")
    layer = _gpu_layer(rng, GRAPH_CFG, expert_strategy="syncfree")
    g = layer.graphed(capture_sizes=(1, 8))
    for T in (5, 5, 8, 1, 5, 3, 3, 8, 2):
        x = cp.asarray(random_x(rng, T, GRAPH_CFG.hidden_size, "bfloat16"))
        y = g(x)
        cp.testing.assert_array_equal(y, layer(_padded(x, 8 if T > 1 else 1))[:T])
        if T > 1:
            assert int(g._n_valid.get()[0]) == T


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_replay_matches_reference_with_auto_strategy(dtype, rng):
    # "auto" takes the cuBLAS paths eagerly above PAIRS_MAX pairs; the graph the sync-free
    # ones: both within the tolerance of the exact result. T = 1 and T = max_tokens included.
    cp = pytest.importorskip("cupy")
    cfg = dataclasses.replace(GRAPH_CFG, dtype=dtype)
    layer = _gpu_layer(rng, cfg)
    big = PAIRS_MAX // cfg.top_k + 30
    g = layer.graphed(capture_sizes=(1, 8, big))
    for T in (1, 3, 8, big - 7, big):
        x = cp.asarray(random_x(rng, T, cfg.hidden_size, dtype))
        ref, _ = layer.reference(x)
        assert relative_error(g(x).get(), ref) <= TOL[dtype]


@pytest.mark.gpu
def test_replay_zero_expert_only_tokens_and_constant_experts(rng):
    cp = pytest.importorskip("cupy")
    cfg = zm.MoEConfig(hidden_size=264, intermediate_size=96, num_experts=10,
                       num_zero_experts=3, top_k=3, use_correction_bias=True,
                       zero_expert_type=("identity", "zero", "constant"), dtype="bfloat16")
    layer = _gpu_layer(rng, cfg, expert_strategy="syncfree")
    g = layer.graphed(capture_sizes=(4, 128))
    x = cp.asarray(random_x(rng, 100, cfg.hidden_size, "bfloat16"))
    ref, _ = layer.reference(x)
    assert relative_error(g(x).get(), ref) <= TOL["bfloat16"]
    layer.e_score_correction_bias[10:] += 10  # in place: every slot now goes to a zero expert
    for T in (3, 100):
        x = cp.asarray(random_x(rng, T, cfg.hidden_size, "bfloat16"))
        r = layer.route(x)
        assert bool((r.topk_ids >= cfg.num_experts).all())
        ref, _ = layer.reference(x)
        y = g(x)
        assert relative_error(y.get(), ref) <= TOL["bfloat16"]
        cp.testing.assert_array_equal(y, layer(_padded(x, 4 if T <= 4 else 128))[:T])


@pytest.mark.gpu
def test_replay_sees_weights_written_in_place(rng):
    cp = pytest.importorskip("cupy")
    layer = _gpu_layer(rng, GRAPH_CFG, expert_strategy="syncfree")
    g = layer.graphed(capture_sizes=(2, 64))
    H = GRAPH_CFG.hidden_size
    xs = [cp.asarray(random_x(rng, T, H, "bfloat16")) for T in (2, 50)]
    before = [g(x) for x in xs]
    new = random_layer_weights(rng, GRAPH_CFG, bias_scale=0.02)
    for name in ("router_weight", "w13", "w2", "e_score_correction_bias"):
        getattr(layer, name)[...] = cp.asarray(new[name])
    for x, y0, size in zip(xs, before, (2, 64)):
        y = g(x)
        assert not bool((y == y0).all())
        cp.testing.assert_array_equal(y, layer(_padded(x, size))[:x.shape[0]])
        ref, _ = layer.reference(x)
        assert relative_error(y.get(), ref) <= TOL["bfloat16"]


@pytest.mark.gpu
def test_replay_with_router_logits(rng):
    cp = pytest.importorskip("cupy")
    layer = _gpu_layer(rng, GRAPH_CFG, expert_strategy="syncfree")
    g = layer.graphed(max_tokens=16, router_logits=True)
    N, H = GRAPH_CFG.num_total_experts, GRAPH_CFG.hidden_size
    for T in (1, 5, 16):
        x = cp.asarray(random_x(rng, T, H, "bfloat16"))
        logits = cp.asarray(rng.standard_normal((T, N)).astype(np.float32))
        y = g(x, router_logits=logits)
        size = g.capture_sizes[np.searchsorted(g.capture_sizes, T)]
        lp = cp.zeros((size, N), np.float32)
        lp[:T] = logits
        cp.testing.assert_array_equal(y, layer(_padded(x, size), router_logits=lp)[:T])
        ref, _ = layer.reference(x, router_logits=logits)
        assert relative_error(y.get(), ref) <= TOL["bfloat16"]
    with pytest.raises(ValueError, match="router_logits"):
        g(x)
    with pytest.raises(ValueError, match="router_logits"):
        g(x, router_logits=cp.zeros((T, N + 1), np.float32))


@pytest.mark.gpu
def test_replay_deterministic_layer_and_other_stream(rng):
    cp = pytest.importorskip("cupy")
    layer = _gpu_layer(rng, GRAPH_CFG, deterministic=True)
    g = layer.graphed(capture_sizes=(3, 40))
    x = cp.asarray(random_x(rng, 37, GRAPH_CFG.hidden_size, "bfloat16"))
    expected = layer(x)  # deterministic: a token's bits do not depend on the batch
    cp.cuda.get_current_stream().synchronize()  # x and expected, before another stream reads
    with cp.cuda.Stream(non_blocking=True) as s:
        y = g(x)
    s.synchronize()
    cp.testing.assert_array_equal(y, expected)


@pytest.mark.gpu
def test_graphed_call_errors(rng):
    cp = pytest.importorskip("cupy")
    layer = _gpu_layer(rng, GRAPH_CFG)
    g = layer.graphed(max_tokens=8)
    H = GRAPH_CFG.hidden_size
    with pytest.raises(ValueError, match="max_tokens=8"):
        g(cp.zeros((9, H), layer.w13.dtype))
    with pytest.raises(ValueError, match="shape"):
        g(cp.zeros((2, H + 1), layer.w13.dtype))
    with pytest.raises(TypeError, match="dtype"):
        g(cp.zeros((2, H), np.float32))
    with pytest.raises(TypeError, match="CUDA"):
        g(np.zeros((2, H), layer.w13.dtype))
    with pytest.raises(ValueError, match="router_logits"):
        g(cp.zeros((2, H), layer.w13.dtype), router_logits=cp.zeros((2, 48), np.float32))
    assert g(cp.zeros((0, H), layer.w13.dtype)).shape == (0, H)


@pytest.mark.gpu
def test_bench_graph_columns(tmp_path, capsys):
    import json

    from zeromoe_cupy.cli import main
    out = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--tokens", "1,16", "--quick", "--graph",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(r["graph_ms"] > 0 and r["graph_ratio_to_floor"] > 0 for r in rows)
    assert "graph ms" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["auto", "capacity", "syncfree"])
def test_expert_paths_with_no_real_experts(strategy, rng):
    # E = 0: every slot is a zero expert; no path divides by E or launches an empty grid
    cp = pytest.importorskip("cupy")
    import ml_dtypes
    T, H, I, K = 300, 64, 32, 4
    x = cp.asarray(random_x(rng, T, H, "bfloat16"))
    ids = cp.asarray(rng.integers(0, 4, (T, K)).astype(np.int32))
    w13 = cp.zeros((0, 2 * I, H), ml_dtypes.bfloat16)
    w2 = cp.zeros((0, H, I), ml_dtypes.bfloat16)
    out = zm.ops.expert_mlp(x, ids, w13, w2, strategy=strategy)
    assert out.rows.shape[1] == H
    assert (out.slot_rows.get() == -1).all()


# --- programmatic dependent launch (_compile.py) -----------------------------------------------
@pytest.mark.gpu
def test_programmatic_launch_where_the_gpu_has_it():
    cp = pytest.importorskip("cupy")
    from zeromoe_cupy._compile import programmatic_launches
    cc = int(cp.cuda.Device().compute_capability)
    with programmatic_launches() as on:
        assert on == (cc >= 90)
    with programmatic_launches(False) as on:
        assert not on


PDL_CFG = zm.MoEConfig(hidden_size=256, intermediate_size=1024, num_experts=16,
                       num_zero_experts=3, top_k=4, use_correction_bias=True,
                       zero_expert_type=("identity", "zero", "constant"))


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "fp8"])
@pytest.mark.parametrize("strategy,T", [("auto", 1), ("auto", 40), ("auto", 700),
                                        ("syncfree", 64), ("capacity", 64), ("fixed", 24),
                                        ("grouped", 64), ("padded", 300), ("pairs", 9)])
def test_eager_forward_with_programmatic_launches_equals_plain(strategy, T, quantization, rng):
    """Every kernel of every path launched through cuLaunchKernelEx (each waits for the one
    before it first, so eagerly too the stream's order holds) gives the plain launch's bits:
    its arguments reach it as CuPy passes them."""
    cp = pytest.importorskip("cupy")
    from zeromoe_cupy._compile import programmatic_launches
    layer = _gpu_layer(rng, PDL_CFG, expert_strategy=strategy)
    if quantization:
        layer = layer.quantize(quantization)
        layer.expert_strategy = strategy
    x = cp.asarray(random_x(rng, T, PDL_CFG.hidden_size, "bfloat16"))
    plain = layer(x)
    with programmatic_launches():
        y = layer(x)
    cp.testing.assert_array_equal(y, plain)
    ref, _ = layer.reference(x, routing=layer.route(x))  # one routing: no near-tie flips
    assert relative_error(y.get().astype(np.float32), ref) <= \
        (5e-3 if quantization else TOL["bfloat16"])


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_replay_with_and_without_programmatic_launch_agree_bitwise(quantization, rng,
                                                                   monkeypatch):
    """The graphs captured with programmatic dependent launch (the default) and with plain
    launches give the same bits at every size, with new x (new routing) each call."""
    cp = pytest.importorskip("cupy")
    layer = _gpu_layer(rng, PDL_CFG)
    if quantization:
        layer = layer.quantize(quantization)
    sizes = (1, 4, 16, 64, 200)
    g = layer.graphed(capture_sizes=sizes)
    monkeypatch.setattr(graphs, "PROGRAMMATIC_LAUNCH", False)
    g_plain = layer.graphed(capture_sizes=sizes)
    for size in sizes:
        for T in sorted({size, max(1, size - 3)}):
            for _ in range(3):
                x = cp.asarray(random_x(rng, T, PDL_CFG.hidden_size, "bfloat16"))
                cp.testing.assert_array_equal(g(x), g_plain(x))
