"""Expert parallelism on the CPU: R thread ranks (local_groups) against the whole layer and the
float64 reference; the exchange's row and byte counts; failures that must not hang; the
launcher's environment and rendezvous."""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy import cli
from zeromoe_cupy.parallel import launch as launch_mod
from zeromoe_cupy.reference import relative_error

from conftest import TOL
from helpers import random_layer_weights, random_x

BASE = dict(hidden_size=48, intermediate_size=24, num_experts=12, num_zero_experts=4, top_k=4)
# Token counts per rank: unequal, with empty ranks.
TOKENS = {2: (9, 0), 3: (5, 11, 0), 4: (0, 7, 1, 13)}


def run_ranks(cfg, weights, xs, timeout=30.0, **call):
    """Each rank builds its layer from the full weights and runs xs[rank]; returns per rank
    (y, routing, stats)."""
    def body(g):
        layer = zm.ZeroExpertMoE.from_weights(cfg, **weights, group=g)
        assert layer.w13.shape[0] == cfg.num_experts // g.world_size
        kw = {k: v[g.rank] for k, v in call.items()}
        y = layer(xs[g.rank], **kw)
        return y, layer.route(xs[g.rank]), layer.last_exchange
    return zm.parallel.run_local(body, len(xs), timeout)


def check_against_whole(cfg, weights, xs, outs, tol_ratio=2.0):
    whole = zm.ZeroExpertMoE.from_weights(cfg, **weights)
    for x, (y, _, _) in zip(xs, outs):
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.shape[0] == 0:
            continue
        ref, _ = whole.reference(x)
        err = relative_error(y, ref)
        single = relative_error(whole(x), ref)
        assert err <= TOL[cfg.dtype], err
        assert err <= tol_ratio * single + 1e-7, (err, single)


@pytest.mark.parametrize("R", [2, 3, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ranks_equal_whole_layer(R, dtype, rng):
    cfg = zm.MoEConfig(**BASE, dtype=dtype, zero_expert_type=("identity", "zero", "constant",
                                                                "identity"))
    w = random_layer_weights(rng, cfg)
    xs = [random_x(rng, T, cfg.hidden_size, dtype) for T in TOKENS[R]]
    outs = run_ranks(cfg, w, xs)
    check_against_whole(cfg, w, xs, outs)


@pytest.mark.parametrize("overrides", [
    dict(zero_expert_type="zero"), dict(zero_expert_type="constant"),
    dict(num_expert_group=4, topk_group=2, use_correction_bias=True),
    dict(scoring_func="sigmoid", renormalize=True, routed_scaling_factor=2.5),
    dict(num_zero_experts=0),
], ids=["zero", "constant", "grouped", "sigmoid_renorm", "no_zero_experts"])
def test_ranks_equal_whole_layer_options(overrides, rng):
    cfg = zm.MoEConfig(**{**BASE, **overrides}, dtype="float32")
    w = random_layer_weights(rng, cfg, bias_scale=0.05 if cfg.use_correction_bias else 0.0)
    xs = [random_x(rng, T, cfg.hidden_size, "float32") for T in (6, 10, 3)]
    check_against_whole(cfg, w, xs, run_ranks(cfg, w, xs))


def test_router_logits_and_routing_keep_their_meaning(rng):
    cfg = zm.MoEConfig(**BASE, dtype="float32")
    w = random_layer_weights(rng, cfg)
    whole = zm.ZeroExpertMoE.from_weights(cfg, **w)
    xs = [random_x(rng, T, cfg.hidden_size, "float32") for T in (5, 8)]
    logits = [rng.standard_normal((x.shape[0], cfg.num_total_experts)).astype(np.float32)
              for x in xs]
    outs = run_ranks(cfg, w, xs, router_logits=logits)
    for x, lg, (y, _, _) in zip(xs, logits, outs):
        ref, _ = whole.reference(x, router_logits=lg)
        assert relative_error(y, ref) <= TOL["float32"]
    routings = [whole.route(x) for x in xs]
    outs = run_ranks(cfg, w, xs, routing=routings)
    for x, r, (y, _, _) in zip(xs, routings, outs):
        ref, _ = whole.reference(x, routing=(r.topk_ids, r.topk_weights))
        assert relative_error(y, ref) <= TOL["float32"]


def test_rows_and_bytes_count_real_pairs_only(rng):
    # A strong bias towards the zero experts: many tokens need no other rank at all.
    cfg = zm.MoEConfig(**BASE, dtype="bfloat16", use_correction_bias=True)
    w = random_layer_weights(rng, cfg)
    w["e_score_correction_bias"][cfg.num_experts:] = 0.1
    R = 3
    xs = [random_x(rng, T, cfg.hidden_size, "bfloat16") for T in (20, 0, 31)]
    outs = run_ranks(cfg, w, xs)
    E, K, H = cfg.num_experts, cfg.top_k, cfg.hidden_size
    per = E // R
    sent = np.zeros((R, R), int)  # sent[src, dst]: tokens of src with a real expert on dst
    for src, (_, routing, _) in enumerate(outs):
        ids = routing.topk_ids
        for dst in range(R):
            on_dst = (ids < E) & (ids // per == dst)
            sent[src, dst] = int(on_dst.any(axis=1).sum())
    assert sent.sum() < sum(x.shape[0] for x in xs) * min(K, R)  # the bias took effect
    row = H * 2 + K * 8
    for r, (_, _, st) in enumerate(outs):
        out_rows = sent[r].sum() - sent[r, r]
        in_rows = sent[:, r].sum() - sent[r, r]
        assert (st.rows_sent, st.rows_received, st.rows_local) == (out_rows, in_rows, sent[r, r])
        assert st.dispatch_bytes_sent == out_rows * row
        assert st.dispatch_bytes_received == in_rows * row
        assert st.combine_bytes_sent == in_rows * H * 2
        assert st.combine_bytes_received == out_rows * H * 2


def test_random_constructor_keeps_the_slice_of_the_whole_layer():
    cfg = zm.MoEConfig(**BASE, dtype="bfloat16", zero_expert_type="constant")
    whole = zm.ZeroExpertMoE(cfg, seed=7, device="cpu")
    R = 3
    per = cfg.num_experts // R
    for g in zm.parallel.local_groups(R):  # constructors do not communicate
        part = zm.ZeroExpertMoE(cfg, seed=7, device="cpu", group=g)
        sl = slice(g.rank * per, (g.rank + 1) * per)
        np.testing.assert_array_equal(part.w13, whole.w13[sl])
        np.testing.assert_array_equal(part.w2, whole.w2[sl])
        np.testing.assert_array_equal(part.router_weight, whole.router_weight)
        np.testing.assert_array_equal(part.const_gate, whole.const_gate)


def test_gather_layer_rebuilds_the_whole_layer(rng):
    cfg = zm.MoEConfig(**BASE, dtype="float32")
    w = random_layer_weights(rng, cfg)
    parts = [zm.ZeroExpertMoE.from_weights(cfg, **w, group=g)
             for g in zm.parallel.local_groups(4)]
    whole = zm.parallel.gather_layer(parts[::-1])
    np.testing.assert_array_equal(whole.w13, w["w13"])
    np.testing.assert_array_equal(whole.w2, w["w2"])
    with pytest.raises(ValueError, match="rank layer"):
        parts[0].reference(random_x(rng, 2, cfg.hidden_size, "float32"))


@pytest.mark.parametrize("R", [5, 7])
def test_experts_not_divisible_by_ranks(R, rng):
    cfg = zm.MoEConfig(**BASE, dtype="float32")
    w = random_layer_weights(rng, cfg)
    for g in zm.parallel.local_groups(R, timeout=0.5):  # sequential: no rank may wait
        with pytest.raises(ValueError, match="divide the 12 real experts"):
            zm.ZeroExpertMoE.from_weights(cfg, **w, group=g)
        with pytest.raises(ValueError, match="divide the 12 real experts"):
            zm.ZeroExpertMoE(cfg, seed=0, device="cpu", group=g)


def test_a_rank_that_raises_does_not_hang_the_others(rng):
    cfg = zm.MoEConfig(**BASE, dtype="float32")
    w = random_layer_weights(rng, cfg)

    def body(g):
        layer = zm.ZeroExpertMoE.from_weights(cfg, **w, group=g)
        x = random_x(np.random.default_rng(g.rank), 4, cfg.hidden_size, "float32")
        layer(x)  # one collective call together
        if g.rank == 1:
            raise KeyError("rank one's own failure")
        return layer(x)

    with pytest.raises(KeyError, match="rank one's own failure") as exc:
        zm.parallel.run_local(body, 3, timeout=60.0)  # the abort, not the timeout, ends it
    assert "rank 1 of 3" in "".join(getattr(exc.value, "__notes__", [])) + str(exc.value.__cause__)


# One rank built with another config: (overrides on the last rank, the message's detail).
MISMATCHES = [
    (dict(hidden_size=40), "hidden_size 40 here, 48 on rank 0"),
    (dict(top_k=2), "top_k 2 here, 4 on rank 0"),
    (dict(num_experts=6), "num_experts 6 here, 12 on rank 0"),
    (dict(num_zero_experts=2), "num_zero_experts 2 here, 4 on rank 0"),
    (dict(intermediate_size=16), "intermediate_size 16 here, 24 on rank 0"),
    (dict(dtype="bfloat16"), "dtype 'bfloat16' here, another value on rank 0"),
    (dict(scoring_func="sigmoid", routed_scaling_factor=2.0),
     "scoring_func 'sigmoid' here, another value on rank 0; routed_scaling_factor 2.0 here"),
]


@pytest.mark.parametrize("R", [2, 3])
@pytest.mark.parametrize("overrides,detail", MISMATCHES, ids=[str(m[0]) for m in MISMATCHES])
def test_ranks_with_different_configs_raise_naming_the_field(R, overrides, detail):
    """Every rank raises a ValueError at the first forward, before any row moves: the one
    that differs names its own value and another rank's; the others name the odd rank."""
    errors = [None] * R

    def body(g):
        cfg = zm.MoEConfig(**{**BASE, "dtype": "float32", **(overrides if g.rank == R - 1
                                                              else {})})
        w = random_layer_weights(np.random.default_rng(0), cfg)
        layer = zm.ZeroExpertMoE.from_weights(cfg, **w, group=g)
        x = random_x(np.random.default_rng(g.rank), 3 + g.rank, cfg.hidden_size, cfg.dtype)
        try:
            layer(x)
        except ValueError as exc:
            errors[g.rank] = str(exc)

    zm.parallel.run_local(body, R, timeout=30.0)
    assert detail in errors[R - 1], errors[R - 1]
    for r in range(R - 1):
        assert f"on rank {R - 1}" in errors[r], errors[r]
    assert all(e.startswith("config: the rank layers of one group must share one MoEConfig")
               for e in errors)


def test_a_rank_that_stops_times_out_naming_it(rng):
    groups = zm.parallel.local_groups(3, timeout=0.3)
    errors = {}

    def body(g):
        try:
            g.exchange_counts(np.arange(3))
        except Exception as exc:  # noqa: BLE001
            errors[g.rank] = exc

    threads = [threading.Thread(target=body, args=(g,)) for g in groups[:2]]  # rank 2 absent
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(errors) == {0, 1}
    assert any(isinstance(e, TimeoutError) and "rank(s) [2]" in str(e) for e in errors.values())
    for e in errors.values():
        assert "[2]" in str(e)


def test_group_all_to_all_moves_unequal_splits(rng):
    R = 3
    splits = rng.integers(0, 4, (R, R))  # splits[src, dst]
    data = [[rng.standard_normal((splits[s, d], 2)).astype(np.float32) for d in range(R)]
            for s in range(R)]

    def body(g):
        s = g.rank
        sent, received = g.exchange_counts(splits[s])
        np.testing.assert_array_equal(received[:, 0], splits[:, s])
        send = np.concatenate(data[s])
        recv = np.empty((int(received.sum()), 2), np.float32)
        g.all_to_all([send], sent[:, 0], [recv], received[:, 0])
        return recv

    for d, recv in enumerate(zm.parallel.run_local(body, R)):
        np.testing.assert_array_equal(recv, np.concatenate([data[s][d] for s in range(R)]))


# --- launcher environment, rendezvous and `zeromoe launch` --------------------------------------
def test_rank_info_from_each_launcher():
    info = launch_mod.rank_info({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                 "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    assert info == (1, 4, 1, "node0", 29500)
    info = launch_mod.rank_info({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                 "MASTER_ADDR": "h", "MASTER_PORT": "29500",
                                 "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert info.master_port == 29501  # torchrun's agent store holds MASTER_PORT
    info = launch_mod.rank_info({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
                                 "OMPI_COMM_WORLD_LOCAL_RANK": "3", "MASTER_ADDR": "a",
                                 "MASTER_PORT": "1234"})
    assert info[:3] == (3, 8, 3)
    info = launch_mod.rank_info({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                 "MASTER_ADDR": "a", "MASTER_PORT": "1234"})
    assert info[:3] == (5, 16, 1)


@pytest.mark.parametrize("env, match", [
    ({}, "no launcher variables"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "70000"},
     r"MASTER_PORT: expected a TCP port in \[1, 65535\].*70000"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "0"}, "MASTER_PORT"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "29500",
      "ZEROMOE_RENDEZVOUS_PORT": "-1"}, "ZEROMOE_RENDEZVOUS_PORT: expected a TCP port"),
])
def test_rank_info_errors(env, match):
    with pytest.raises(ValueError, match=match):
        launch_mod.rank_info(env)


def test_rendezvous_passes_rank0_payload_and_times_out_naming_the_address():
    port = launch_mod.free_port()
    infos = [launch_mod.RankInfo(r, 3, r, "127.0.0.1", port) for r in range(3)]
    got = {}

    def body(info):
        got[info.rank] = launch_mod.rendezvous(info, [1, -2, 3] if info.rank == 0 else None, 20)

    threads = [threading.Thread(target=body, args=(i,)) for i in infos]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {0: [1, -2, 3], 1: [1, -2, 3], 2: [1, -2, 3]}
    lonely = launch_mod.RankInfo(1, 2, 1, "127.0.0.1", launch_mod.free_port())
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{lonely.master_port}"):
        launch_mod.rendezvous(lonely, None, 0.3)


def test_launch_sets_the_environment_and_stops_the_others_on_failure(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        from zeromoe_cupy.parallel.launch import rank_info, rendezvous
        info = rank_info()
        got = rendezvous(info, "hello" if info.rank == 0 else None, 30)
        print("rank", info.rank, "of", info.world_size, "local", info.local_rank, got)
        if sys.argv[1] == "fail":
            if info.rank == 1:
                sys.exit(3)
            time.sleep(30)
            open(os.path.join(sys.argv[2], f"late{info.rank}"), "w").close()
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "zeromoe_cupy", "launch", "-n", "3", str(script)]
    ok = subprocess.run(cmd + ["pass", str(tmp_path)], env=env, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for r in range(3):
        assert f"[rank {r}] rank {r} of 3 local {r} hello" in ok.stdout
    bad = subprocess.run(cmd + ["fail", str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 3
    assert "rank 1 exited with status 3" in bad.stderr
    assert not list(tmp_path.glob("late*"))  # ranks 0 and 2 were stopped


class _FakeRank:
    """A rank process that has already exited with status 0."""

    def __init__(self, *args, **kwargs):
        self.stdout = None

    def poll(self):
        return 0


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_launch_refuses_more_ranks_than_gpus_before_starting_any(gpus, monkeypatch):
    started = []
    monkeypatch.setattr(launch_mod, "_gpus_seen", lambda: gpus)
    monkeypatch.setattr(launch_mod.subprocess, "Popen",
                        lambda *a, **k: started.append(a) or _FakeRank())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError, match=rf"^nprocs \(-n\): {gpus + 1} ranks asked for, but "
                                         rf"{gpus} GPU\(s\) are visible; expected at most {gpus}"):
        launch_mod.launch(gpus + 1, ["-c", "pass"], prefix=False)
    assert not started
    assert launch_mod.launch(gpus, ["-c", "pass"], prefix=False) == 0
    assert len(started) == gpus


def test_launch_names_cuda_visible_devices_and_the_cli_says_it_in_one_line(monkeypatch, capsys,
                                                                          tmp_path):
    monkeypatch.setattr(launch_mod, "_gpus_seen", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "script.py").write_text("")  # (a missing script is reported first)
    with pytest.raises(SystemExit) as exc:
        cli.main(["launch", "-n", "4", "script.py"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "zeromoe launch: error: nprocs (-n): 4 ranks asked for, but 2 GPU(s) are visible "
        "(CUDA_VISIBLE_DEVICES='3,5'); expected at most 2, one GPU per rank")


def test_bench_ep_refuses_more_ranks_than_gpus(monkeypatch, capsys):
    from zeromoe_cupy import bench
    monkeypatch.setattr(bench, "gpu_available", lambda: True)
    monkeypatch.setattr(launch_mod, "_gpus_seen", lambda: 1)
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--ep", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "zeromoe bench: error: argument --ep: 2 ranks asked for, but 1 GPU(s) are visible")


def test_launch_without_a_gpu_starts_the_ranks_after_a_note(monkeypatch, capsys):
    started = []
    monkeypatch.setattr(launch_mod, "_gpus_seen", lambda: None)
    monkeypatch.setattr(launch_mod.subprocess, "Popen",
                        lambda *a, **k: started.append(a) or _FakeRank())
    assert launch_mod.launch(3, ["-c", "pass"], prefix=False) == 0
    assert len(started) == 3
    err = capsys.readouterr().err
    assert "no usable CUDA GPU" in err and "zm.parallel.local_groups(3)" in err


@pytest.mark.parametrize("wants", [bytes, tuple])
def test_nccl_unique_id_reaches_the_communicator_in_the_type_cupy_wants(wants):
    # CuPy >= 14 gives and takes the id as bytes, older CuPy as a tuple of signed chars; the
    # id travels from rank 0 as a JSON list of its ints.
    from zeromoe_cupy.parallel.group import _communicator
    uid = bytes(range(120, 248)) if wants is bytes else tuple(range(-64, 64))

    class FakeNccl:
        @staticmethod
        def NcclCommunicator(world, comm_id, rank):
            if not isinstance(comm_id, wants):
                raise TypeError(f"Argument 'commId' has incorrect type (expected {wants})")
            return world, comm_id, rank

    assert _communicator(FakeNccl, 2, list(uid), 1) == (2, uid, 1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_ranks_equal_whole_layer(dtype, rng):
    # e4m3 experts and their block scales are sliced per rank like the experts themselves.
    cfg = zm.MoEConfig(**{**BASE, "hidden_size": 160, "intermediate_size": 136}, dtype=dtype)
    whole = zm.ZeroExpertMoE.from_weights(cfg, **random_layer_weights(rng, cfg)).quantize("fp8")
    w = whole.numpy_weights()
    xs = [random_x(rng, T, cfg.hidden_size, dtype) for T in (7, 0, 12)]
    outs = run_ranks(whole.config, w, xs)
    for x, (y, _, _) in zip(xs, outs):
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.shape[0]:
            ref, _ = whole.reference(x)
            assert relative_error(y, ref) <= 5e-3


@pytest.mark.parametrize("failing", [0, 2])
def test_run_local_raises_the_failing_ranks_own_exception(failing, rng):
    """A constructor's ValueError (E not divisible by R) arrives as that ValueError, the same
    object, naming the rank; the other ranks, waiting in a collective, do not hang."""
    cfg = zm.MoEConfig(**BASE, dtype="float32")
    w = random_layer_weights(rng, cfg)
    raised = {}

    def body(g):
        if g.rank == failing:
            bad = zm.MoEConfig(**{**BASE, "num_experts": 13}, dtype="float32")
            try:
                zm.ZeroExpertMoE(bad, seed=0, device="cpu", group=g)
            except ValueError as exc:
                raised["exc"] = exc
                raise
        layer = zm.ZeroExpertMoE.from_weights(cfg, **w, group=g)
        return layer(random_x(np.random.default_rng(g.rank), 3, cfg.hidden_size, "float32"))

    with pytest.raises(ValueError, match="divide the 13 real experts") as exc:
        zm.parallel.run_local(body, 3, timeout=60.0)
    assert exc.value is raised["exc"]
    assert f"rank {failing} of 3" in "".join(getattr(exc.value, "__notes__", [])) \
        + str(exc.value.__cause__)


def test_gather_layer_of_fp8_ranks_and_its_bad_inputs(rng):
    cfg = zm.MoEConfig(**{**BASE, "hidden_size": 160, "intermediate_size": 136},
                       dtype="bfloat16")
    whole = zm.ZeroExpertMoE.from_weights(cfg, **random_layer_weights(rng, cfg)).quantize("fp8")
    w = whole.numpy_weights()
    ranks = zm.parallel.run_local(
        lambda g: zm.ZeroExpertMoE.from_weights(whole.config, **w, group=g), 2)
    back = zm.parallel.gather_layer(ranks)
    for name in ("w13", "w2", "w13_scale_inv", "w2_scale_inv"):
        np.testing.assert_array_equal(getattr(back, name).view(np.uint8),
                                      getattr(whole, name).view(np.uint8))
    with pytest.raises(TypeError, match="rank_layers"):
        zm.parallel.gather_layer([])
    with pytest.raises(TypeError, match="rank_layers"):
        zm.parallel.gather_layer([whole])


def test_nccl_group_without_cupy_says_what_to_install(monkeypatch):
    from zeromoe_cupy.parallel import group
    monkeypatch.setattr(group, "cupy_module", lambda: None)
    with pytest.raises(RuntimeError, match="NcclGroup needs CuPy.*local_groups"):
        group.NcclGroup(0, 1, b"")
