"""Does programmatic dependent launch shorten a graph's kernel-to-kernel gaps here? A chain of
small kernels (copy_16byte, one block, ping-pong between two buffers) captured as a graph with
plain launches and with programmatic_launches(); per-kernel replay time (median of CUDA-event
timings), and the captured graph's edges by type (cuGraphGetEdges through cuda-bindings).
Usage: pdl_chain.py [--kernels 64]
"""
import argparse

import cupy as cp
import numpy as np

from zeromoe_cupy._compile import programmatic_launches, raw_module

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--kernels", type=int, default=64, help="kernels per graph (%(default)s)")
n_kernels = parser.parse_args().kernels
kernel = raw_module("copy.cu", ["copy_16byte"]).get_function("copy_16byte")
a, b = cp.zeros(4096, np.float32), cp.zeros(4096, np.float32)
n = np.int64(a.nbytes // 16)


def edge_types(graph):
    from cuda.bindings import driver
    handle = getattr(graph, "graph", None)
    if handle is None:
        return "no graph handle on cupy.cuda.graph.Graph"
    try:
        result = driver.cuGraphGetEdges(driver.CUgraph(handle), 0)
        count = result[-1]
        result = driver.cuGraphGetEdges(driver.CUgraph(handle), count)
    except Exception as exc:  # noqa: BLE001 - a diagnostic
        return f"cuGraphGetEdges failed: {exc!r}"
    if result[0] != driver.CUresult.CUDA_SUCCESS:
        return f"cuGraphGetEdges failed: {result[0]!r}"
    if len(result) < 5:
        return f"{count} edges (no edge data in this binding)"
    types = {}
    for d in result[3][:count]:
        key = (int(d.type), int(d.from_port))
        types[key] = types.get(key, 0) + 1
    return f"{count} edges, (type, from_port): count {types}"


def capture(programmatic: bool):
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        for _ in range(2):
            kernel((1,), (128,), (a, b, n))
        s.begin_capture()
        with programmatic_launches(programmatic) as on:
            for i in range(n_kernels):
                src, dst = (a, b) if i % 2 == 0 else (b, a)
                kernel((1,), (128,), (src, dst, n))
        g = s.end_capture()
    return g, s, on


def per_kernel_us(g, s, reps=30):
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record(s)
        g.launch(s)
        end.record(s)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) * 1e3 / n_kernels)
    return float(np.median(times[5:]))


for programmatic in (False, True, False, True):
    g, s, on = capture(programmatic)
    print(f"programmatic={programmatic} (in effect: {on}): {per_kernel_us(g, s):.2f} us per "
          f"kernel; {edge_types(g)}", flush=True)
