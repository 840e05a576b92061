import os
import zlib

import numpy as np
import pytest

from zeromoe_cupy._arrays import gpu_available

HAS_GPU = gpu_available()
if not HAS_GPU:
    # Without a GPU the Numba routing kernel runs under the CUDA simulator; this must be set
    # before numba is first imported (the package itself never imports numba at import time).
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# ||y - ref|| / ||ref|| against the float64 reference (docs/spec.md).
TOL = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 1e-2}


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    selected, deselected = [], []
    for item in items:
        (deselected if item.get_closest_marker("gpu") else selected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


# Fresh random inputs on every run, reproducible: each test's generator is seeded from this
# run's seed (ZEROMOE_TEST_SEED, else drawn now; pytest's header prints it) and the test's
# name. (Python's hash() of a name differs between processes: it reproduced nothing.)
TEST_SEED = int(os.environ.get("ZEROMOE_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)


def pytest_report_header(config):
    return f"zeromoe_cupy tests: ZEROMOE_TEST_SEED={TEST_SEED} reproduces this run's inputs"


@pytest.fixture
def rng(request):
    return np.random.default_rng([TEST_SEED, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture(autouse=True)
def _free_gpu_memory(request):
    # GPU tests build layers of tens of GB (LongCat-Flash); hand cached blocks back between
    # tests so that CuPy's and torch's pools do not hold two such layers at once.
    if HAS_GPU and request.node.get_closest_marker("gpu"):
        import gc

        import cupy
        gc.collect()
        cupy.get_default_memory_pool().free_all_blocks()
    yield
