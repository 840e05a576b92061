"""`zeromoe bench` without a GPU: the NumPy path on the tiny preset, said to be CPU numbers;
the floor and the workload calibration by hand; the ceilings' plumbing with fake methods."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_bench_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    res = subprocess.run([sys.executable, "-m", "zeromoe_cupy", "bench", "--quick", "--device",
                          "cpu", "--tokens", "1,16,64", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "CPU (NumPy) numbers" in res.stdout
    d = json.loads(out.read_text())
    assert d["device"] == "cpu" and d["preset"] == "tiny"
    assert [r["tokens"] for r in d["rows"]] == [1, 16, 64]
    for r in d["rows"]:
        for stage in bench.STAGES:
            assert r[f"{stage}_ms"] >= 0
        assert r["forward_ms"] > 0
    assert abs(d["real_per_token"] - d["real_per_token_target"]) < 0.05
    # No GPU, no ceilings: the CPU numbers are not put against a floor.
    assert "ceilings" not in d and "copy_bandwidth_Bps" not in d
    assert all("floor_ms" not in r for r in d["rows"])


def test_floor_by_hand():
    cfg = zm.MoEConfig(hidden_size=4, intermediate_size=2, num_experts=3, num_zero_experts=1,
                       top_k=2, dtype="bfloat16")
    ids = np.array([[0, 3], [0, 2]])  # real experts 0 and 2; three real (token, slot) pairs
    floor, bytes_, flops = bench.floor_time(cfg, ids, bandwidth=100.0, rate=1000.0)
    assert bytes_ == 2 * 3 * 4 * 2 * 2 + 2 * 2 * 4 * 2
    assert flops == 2 * 2 * 4 * 4 + 6 * 4 * 2 * 3
    assert floor == max(bytes_ / 100.0, flops / 1000.0)


def test_zero_bias_calibration_hits_the_target():
    cfg = zm.MoEConfig.preset("tiny", top_k=3)
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cpu")
    offset, share = bench.calibrate_zero_bias(layer, 2.0, n_tokens=2048)
    assert abs(share - 2.0) < 0.05
    bias = layer.e_score_correction_bias
    assert (bias[:cfg.num_experts] == 0).all() and (bias[cfg.num_experts:] == np.float32(offset)).all()


def _fake_methods(monkeypatch, rng):
    """Fake ceiling methods with random rates per case, in place of the GPU ones; returns the
    tables of rates they give ({method: {case: rate}}), as the tests' own record."""
    copy = {name: {s: float(rng.uniform(1e12, 5e12)) for s in (1 << 20, 4 << 20)}
            for name in ("way_a", "way_b", "way_c")}
    matmul = {name: {s: float(rng.uniform(1e14, 9e14)) for s in ((8, 16, 32), (64, 8, 16))}
              for name in ("gemm_a", "gemm_b")}
    monkeypatch.setattr(bench, "COPY_METHODS", {
        name: (lambda nbytes, timer, t=t: t[nbytes]) for name, t in copy.items()})
    methods = {name: (lambda shape, dtype, timer, t=t: t[shape] if dtype == "bfloat16" else None)
               for name, t in matmul.items()}
    # A method for another dtype only (as an fp8 one would be): left out for bfloat16.
    methods["fp8_only"] = lambda shape, dtype, timer: 1e18 if dtype == "float8_e4m3fn" else None
    monkeypatch.setattr(bench, "MATMUL_METHODS", methods)
    return copy, matmul


def test_ceilings_are_the_best_way_and_the_floor_uses_them(monkeypatch, rng):
    copy, matmul = _fake_methods(monkeypatch, rng)
    c = bench.measure_ceilings("bfloat16", quick=True, copy_sizes=[1 << 20, 4 << 20],
                               matmul_shapes=[(8, 16, 32), (64, 8, 16)])
    for got, table, case, label in ((c["copy"], copy, "size", lambda s: f"{s >> 20}MiB"),
                                    (c["matmul"], matmul, "shape",
                                     lambda s: "x".join(map(str, s)))):
        best_rate, best_name, best_case = max((r, n, k) for n, t in table.items()
                                              for k, r in t.items())
        assert got["best"] == best_rate and got["method"] == best_name
        assert got[case] == label(best_case)
        assert got["all"] == {n: max(t.values()) for n, t in table.items()}
        assert got["by_" + case] == {n: {label(k): r for k, r in t.items()}
                                     for n, t in table.items()}
    assert c["matmul"]["dtype"] == "bfloat16"
    text = bench.format_ceilings(c)
    for name in list(copy) + list(matmul):
        assert name in text
    assert "fp8_only" not in text

    cfg = zm.MoEConfig(hidden_size=64, intermediate_size=32, num_experts=4, num_zero_experts=2,
                       top_k=3, dtype="bfloat16")
    ids = rng.integers(0, 6, size=(5, 3))
    floor, bytes_, flops = bench.floor_time(cfg, ids, c["copy"]["best"], c["matmul"]["best"])
    best_copy = max(r for t in copy.values() for r in t.values())
    best_matmul = max(r for t in matmul.values() for r in t.values())
    assert floor == max(bytes_ / best_copy, flops / best_matmul)


def test_ceiling_dtype_without_a_method_is_an_error_and_fp8_methods_plug_in(monkeypatch, rng):
    import ml_dtypes
    _fake_methods(monkeypatch, rng)
    with pytest.raises(ValueError, match="float16 matmul"):
        bench.measure_matmul("float16", quick=True, shapes=[(8, 16, 32)])
    got = bench.measure_matmul(ml_dtypes.float8_e4m3fn, quick=True, shapes=[(8, 16, 32)])
    assert got["method"] == "fp8_only" and list(got["all"]) == ["fp8_only"]
    assert got["dtype"] == "float8_e4m3fn"


def test_fp8_floor_by_hand():
    cfg = zm.MoEConfig(hidden_size=256, intermediate_size=136, num_experts=3, top_k=2,
                       dtype="bfloat16", quantization="fp8")
    ids = np.array([[0, 1], [0, 2]])  # three distinct real experts
    _, bytes_, _ = bench.floor_time(cfg, ids, bandwidth=100.0, rate=1000.0)
    # 1 byte per weight; scales: w13 2*2 x 2 blocks, w2 2 x 2 blocks, 4 bytes each; x and y bf16.
    assert bytes_ == 3 * (3 * 256 * 136 + 4 * (8 + 4)) + 2 * 2 * 256 * 2


def test_bench_reports_the_routing_it_times_for_a_gating_residual(tmp_path, monkeypatch):
    # A layer with a gating residual is timed with previous logits: the real slots (and on
    # the GPU the floor) must come from that routing, not from one without the residual.
    from zeromoe_cupy import cli, config
    small = dict(config._PRESETS["moe++-7b"], hidden_size=64, intermediate_size=32)
    monkeypatch.setitem(config._PRESETS, "moe++-7b", small)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--device", "cpu", "--preset", "moe++-7b",
                     "--tokens", "16,64", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    cfg = zm.MoEConfig.preset("moe++-7b")
    layer = zm.ZeroExpertMoE(cfg, seed=0, device="cpu")
    bench.calibrate_zero_bias(layer, cfg.top_k * 2 / 3)
    for row in rows:
        T = row["tokens"]
        x = bench._normal(np, (T, cfg.hidden_size), layer.dtype, 100)
        prev = bench._normal(np, (T, cfg.num_total_experts), np.float32, 7)
        ids = layer.route(x, prev_router_logits=prev).topk_ids
        assert row["real_slots_per_token"] == (ids < cfg.num_experts).sum(axis=1).mean()
