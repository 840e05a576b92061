"""Expert parallelism on GPUs: thread ranks on one GPU, and two processes over NCCL at
LongCat-Flash shapes (tests/ep_gpu_check.py, through `zeromoe launch` and torchrun)."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import zeromoe_cupy as zm
from zeromoe_cupy.reference import relative_error

from conftest import TOL
from helpers import random_layer_weights, random_x

pytestmark = pytest.mark.gpu
CHECK = os.path.join(os.path.dirname(__file__), "ep_gpu_check.py")


def _gpus():
    import cupy
    return cupy.cuda.runtime.getDeviceCount()


def test_local_groups_on_one_gpu(rng):
    import cupy as cp
    cfg = zm.MoEConfig(hidden_size=256, intermediate_size=128, num_experts=16,
                       num_zero_experts=8, top_k=6, dtype="bfloat16",
                       zero_expert_type=("identity", "zero", "constant", "identity") * 2)
    w = {k: cp.asarray(v) for k, v in random_layer_weights(rng, cfg).items()}
    xs = [cp.asarray(random_x(rng, T, cfg.hidden_size, "bfloat16")) for T in (40, 0, 700, 3)]

    def body(g):
        cp.cuda.Device(0).use()
        layer = zm.ZeroExpertMoE.from_weights(cfg, **w, group=g)
        return layer(xs[g.rank])

    outs = zm.parallel.run_local(body, 4)
    whole = zm.ZeroExpertMoE.from_weights(cfg, **w)
    for x, y in zip(xs, outs):
        if x.shape[0]:
            ref, _ = whole.reference(x)
            assert relative_error(y.get(), ref) <= TOL["bfloat16"]


@pytest.mark.parametrize("R,H", [(2, 40), (3, 33)])
def test_gpu_dispatch_equals_the_numpy_dispatch(R, H, rng):
    # The CuPy dispatch (kernels/exchange.cu) sends the same rows, ids and weights in the same
    # order as the NumPy one; H = 33 bf16 rows (66 bytes) take the kernel's byte copy.
    import cupy as cp
    import ml_dtypes
    from zeromoe_cupy.parallel.exchange import Exchange
    E, Z, K = 12, 4, 5
    Ts = [7, 0, 30][:R]
    xs = [rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16) for T in Ts]
    ids = [rng.integers(-1, E + Z, (T, K)).astype(np.int32) for T in Ts]
    ws = [rng.random((T, K), dtype=np.float32) for T in Ts]

    def body(g, xp):
        if xp is not np:
            cp.cuda.Device(0).use()
        ex = Exchange(g, E)
        d = ex.dispatch(xp.asarray(xs[g.rank]), xp.asarray(ids[g.rank]), xp.asarray(ws[g.rank]))
        host = [a if xp is np else a.get() for a in (d.x, d.ids, d.weights, d.handle[0],
                                                      d.handle[1])]
        return host, ex.last_stats

    for (want, want_stats), (got, got_stats) in zip(zm.parallel.run_local(lambda g: body(g, np), R),
                                                    zm.parallel.run_local(lambda g: body(g, cp), R)):
        assert got_stats == want_stats
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a).astype(np.float64),
                                          np.asarray(b).astype(np.float64))


def _run(cmd):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    print(out.stdout[-4000:], out.stderr[-4000:])
    return out


def test_two_ranks_through_zeromoe_launch():
    if _gpus() < 2:
        pytest.skip("needs 2 GPUs")
    out = _run([sys.executable, "-m", "zeromoe_cupy", "launch", "-n", "2", CHECK])
    assert out.returncode == 0
    assert "EP CHECK PASSED on 2 ranks" in out.stdout


def test_two_ranks_through_torchrun():
    if _gpus() < 2:
        pytest.skip("needs 2 GPUs")
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", CHECK])
    assert out.returncode == 0
    assert "EP CHECK PASSED on 2 ranks" in out.stdout
