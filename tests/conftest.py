import os

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


@pytest.fixture
def rng(request):
    # Fresh random inputs per test, reproducible from the test's name.
    seed = abs(hash(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)


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
