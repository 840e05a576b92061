"""The command line refuses what it cannot do with argparse's one-line error and exit status 2,
and says what it leaves out."""
import json
import warnings

import pytest

from zeromoe_cupy import cli
from zeromoe_cupy._arrays import gpu_available

BAD = [
    (["bench", "--tokens", "abc"], "argument --tokens"),
    (["bench", "--tokens", "-5"], "argument --tokens"),
    (["bench", "--tokens", "1,,4"], "argument --tokens"),
    (["bench", "--preset", "nope"], "argument --preset"),
    (["bench", "--strategy", "bogus"], "argument --strategy"),
    (["bench", "--dtype", "float64"], "argument --dtype"),
    (["bench", "--router-gemm", "tf32"], "argument --router-gemm"),
    (["bench", "--peers", "foo"], "argument --peers"),
    (["bench", "--real-per-token", "x"], "argument --real-per-token"),
    (["bench", "--real-per-token", "-1"], "argument --real-per-token"),
    (["bench", "--device", "cpu", "--real-per-token", "5"], "argument --real-per-token"),
    (["bench", "--device", "cpu", "--tokens", "8192"], "argument --tokens"),
    (["bench", "--device", "cpu", "--tokens", "1,8192"], "argument --tokens"),
    (["bench", "--device", "cpu", "--peers", "torch"], "argument --peers"),
    (["bench", "--device", "cpu", "--graph"], "argument --graph"),
    (["bench", "--device", "cpu", "--strategy", "capacity"], "argument --strategy"),
    (["bench", "--seed", "-1"], "argument --seed"),
    (["bench", "--deterministic", "--strategy", "padded"], "argument --deterministic"),
    (["demo", "--tokens", "-3"], "argument --tokens"),
    (["demo", "--tokens", "0"], "argument --tokens"),
    (["demo", "--device", "tpu"], "argument --device"),
    (["launch", "-n", "2", "/no/such/script.py"], "/no/such/script.py: no such script"),
]
if not gpu_available():
    BAD += [(["bench", "--device", "cuda"], "argument --device: cuda: no usable CUDA GPU"),
            (["demo", "--device", "cuda"], "argument --device: cuda: no usable CUDA GPU")]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"zeromoe {argv[0]}: error: {message}"), err
    assert "Traceback" not in err


def test_launch_of_a_missing_script_says_only_that(capsys):
    # checked before the GPU count, whose note (without a GPU) would come first
    with pytest.raises(SystemExit):
        cli.main(["launch", "-n", "2", "/no/such/script.py"])
    err = capsys.readouterr().err
    assert "no such script" in err and "GPU" not in err, err


def test_zero_tokens_bench_warns_nothing(tmp_path, capsys):
    out = tmp_path / "b.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["bench", "--device", "cpu", "--quick", "--tokens", "0",
                         "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [0]


@pytest.mark.skipif(gpu_available(), reason="only without a GPU")
def test_info_says_why_there_is_no_gpu(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("GPU"))
    assert "none usable: " in line and len(line) > len("GPU    none usable: ") + 5


def _refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_checks_its_output_paths_before_running(option, tmp_path, capsys):
    for path in (tmp_path / "missing" / "b.out", tmp_path):  # no such directory; a directory
        last = _refused(["bench", "--device", "cpu", "--tokens", "4", option, str(path)], capsys)
        assert last.startswith(f"zeromoe bench: error: argument {option}: cannot write")
        assert str(path) in last


def test_bench_writes_its_json_and_plot_by_default(tmp_path, monkeypatch, capsys):
    """Without --json / --plot: bench-<preset>-<dtype>-<device>.json and .png in the current
    directory (the plot where matplotlib imports, else a line that says so); --no-save: the
    table only."""
    import importlib.util
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--device", "cpu", "--quick", "--tokens", "3"]
    assert cli.main(argv + ["--no-save"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "bench-tiny-float32-cpu.json").read_text())["rows"]
    assert [r["tokens"] for r in rows] == [3]
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "bench-tiny-float32-cpu.png").stat().st_size > 0
    else:
        assert "no plot" in out
    assert _refused(argv + ["--no-save", "--json", "b.json"], capsys).startswith(
        "zeromoe bench: error: argument --no-save")


def test_bench_refuses_expert_parallelism_on_the_cpu(capsys):
    for argv in (["--device", "cpu", "--ep", "2"], ["--ep", "0"]):
        last = _refused(["bench", "--tokens", "4", *argv], capsys)
        assert last.startswith("zeromoe bench: error: argument --ep")


def test_bench_header_names_the_quantization(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--device", "cpu", "--quick", "--tokens", "2,9",
                     "--quantization", "fp8", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    building = next(l for l in lines if l.startswith("building"))
    assert "fp8" in building
    # the quantization's own error against the unquantized layer: a few percent, never 0
    import json
    errs = [r["rel_err_vs_unquantized"] for r in json.loads(out.read_text())["rows"]]
    assert len(errs) == 2 and all(1e-3 < e < 0.1 for e in errs)
    assert any("err vs unquant" in l for l in lines)


@pytest.mark.parametrize("preset", ["longcat-flash", "moe++-7b"])
def test_bench_out_of_memory_says_what_the_preset_needs(preset, monkeypatch, capsys):
    import zeromoe_cupy as zm

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 36.0 GiB")

    monkeypatch.setattr(zm, "ZeroExpertMoE", no_memory)
    assert cli.main(["bench", "--device", "cpu", "--preset", preset, "--tokens", "1"]) == 1
    cfg = zm.MoEConfig.preset(preset)
    H, I, E, N = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_total_experts
    need = 3 * E * H * I * 2 + N * H * 4  # bf16 experts, fp32 router
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"zeromoe bench: out of host memory building the {preset!r} preset: its weights alone "
        f"take {need / 1e9:.1f} GB (bfloat16); try --preset tiny")
    assert "Traceback" not in err


def test_bench_plot_asked_without_matplotlib_is_refused_before_running(tmp_path, capsys,
                                                                       monkeypatch):
    """--plot given where matplotlib is missing: refused at once (not after the whole run,
    with nothing written)."""
    import importlib.util as util
    real = util.find_spec
    monkeypatch.setattr(util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    last = _refused(["bench", "--device", "cpu", "--tokens", "4", "--plot",
                     str(tmp_path / "b.png")], capsys)
    assert last.startswith("zeromoe bench: error: argument --plot: needs matplotlib")
    assert not (tmp_path / "b.png").exists()
