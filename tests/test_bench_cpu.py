"""`zeromoe bench` without a GPU: the NumPy path on the tiny preset, said to be CPU numbers;
the floor and the workload calibration by hand."""
import json
import os
import subprocess
import sys

import numpy as np

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
