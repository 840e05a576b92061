"""The bench's ceiling methods on the GPU: each copy way copies every byte, and every way
gives a rate (small sizes: this checks that they run, not how fast)."""
import numpy as np
import pytest

from zeromoe_cupy import bench

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("copy", [bench._memcpy_async, bench._copy_16byte])
def test_copy_ways_copy_every_byte(copy, rng):
    import cupy as cp
    _, blocks = bench._copy_kernel()
    # Past the kernel's four-deep loop by a ragged tail, so both of its loops run.
    n = 16 * (4 * blocks * 256 * 3 + 1234)
    src = cp.asarray(rng.integers(0, 256, n, dtype=np.uint8))
    dst = cp.asarray(rng.integers(0, 256, n, dtype=np.uint8))
    copy(src, dst)
    assert bool((dst == src).all())


# The matmul ways of each dtype: the block-scaled FP8 way serves e4m3 only, the others the
# layer dtypes.
FP8_WAYS = {"cublasLt_block_fp8"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_ceiling_way_gives_a_rate(dtype):
    c = bench.measure_ceilings(dtype, quick=True, copy_sizes=[64 << 20],
                               matmul_shapes=[(1024, 512, 768)])
    assert set(c["copy"]["all"]) == set(bench.COPY_METHODS)
    assert set(c["matmul"]["all"]) == set(bench.MATMUL_METHODS) - FP8_WAYS
    for rate in list(c["copy"]["all"].values()) + list(c["matmul"]["all"].values()):
        assert np.isfinite(rate) and rate > 0


def test_the_fp8_matmul_way_gives_a_rate():
    c = bench.measure_matmul("float8_e4m3fn", quick=True, shapes=[(1024, 512, 768)])
    assert set(c["all"]) == FP8_WAYS
    assert np.isfinite(c["best"]) and c["best"] > 0
