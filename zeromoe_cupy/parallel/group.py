"""Communicators for expert parallelism: one small interface, two backends.

A group is R ranks; each rank holds one group object with ``rank`` and ``world_size`` and
calls the same collectives in the same order:

- ``exchange_counts(counts)``: an all-to-all of small int64 counts; row p of ``counts``
  ([R, c], host or device array) goes to rank p. Returns (sent, received) as host arrays
  [R, c]: received[p] is what rank p sent here. The NCCL backend synchronizes the host once.
- ``all_to_all(sends, send_splits, recvs, recv_splits)``: an all-to-all of unequal sizes for a
  few arrays at once. ``sends[i]`` holds rows for every rank in rank order (send_splits[p]
  rows for rank p); ``recvs[i]`` is preallocated and receives recv_splits[p] rows from rank
  p, in rank order. Both sides must agree on the sizes (exchange the counts first).

Backends: ``NcclGroup`` (one process per GPU, NCCL through ``cupy.cuda.nccl``, on CuPy's
current stream) and ``LocalGroup`` (R threads in one process, exchanging NumPy arrays, or CuPy
arrays on one GPU, through shared memory; for tests and research code without GPUs).
"""
from __future__ import annotations

import numbers
import threading
import time
from typing import Any, Sequence

import numpy as np

from .._arrays import check_int, cupy_module, is_cupy

DEFAULT_TIMEOUT_S = 60.0


class Group:
    """The communicator interface (see the module docstring). Subclasses implement
    ``_exchange_counts`` and ``_all_to_all``; the checks live here."""

    rank: int
    world_size: int

    def exchange_counts(self, counts):
        R = self.world_size
        if counts.ndim not in (1, 2) or counts.shape[0] != R:
            raise ValueError(f"counts: expected shape [{R}] or [{R}, c], got {counts.shape}")
        if counts.dtype.kind not in "iu":
            raise TypeError(f"counts: expected an integer array, got {counts.dtype}")
        return self._exchange_counts(counts.reshape(R, -1).astype(np.int64, copy=False))

    def all_to_all(self, sends: Sequence[Any], send_splits, recvs: Sequence[Any],
                   recv_splits) -> None:
        R = self.world_size
        send_splits = [int(s) for s in send_splits]
        recv_splits = [int(s) for s in recv_splits]
        if len(send_splits) != R or len(recv_splits) != R:
            raise ValueError(f"send_splits, recv_splits: expected {R} entries each, got "
                             f"{len(send_splits)} and {len(recv_splits)}")
        if len(sends) != len(recvs):
            raise ValueError(f"sends, recvs: expected as many arrays, got {len(sends)} and "
                             f"{len(recvs)}")
        for i, (s, r) in enumerate(zip(sends, recvs)):
            if s.shape[0] != sum(send_splits) or r.shape[0] != sum(recv_splits):
                raise ValueError(f"sends[{i}], recvs[{i}]: expected {sum(send_splits)} and "
                                 f"{sum(recv_splits)} rows, got {s.shape[0]} and {r.shape[0]}")
            if s.shape[1:] != r.shape[1:] or s.dtype != r.dtype:
                raise ValueError(f"sends[{i}], recvs[{i}]: expected the same row shape and dtype, "
                                 f"got {s.shape[1:]} {s.dtype} and {r.shape[1:]} {r.dtype}")
            if not (s.flags.c_contiguous and r.flags.c_contiguous):
                raise ValueError(f"sends[{i}], recvs[{i}]: expected C-contiguous arrays")
        self._all_to_all(list(sends), send_splits, list(recvs), recv_splits)

    def all_gather_counts(self, values):
        """Every rank's int64 ``values`` [c] (host): an array [R, c], row p from rank p."""
        values = np.asarray(values, np.int64).reshape(1, -1)
        return self.exchange_counts(np.repeat(values, self.world_size, axis=0))[1]

    def barrier(self) -> None:
        self.all_gather_counts(np.zeros(1, np.int64))

    def _exchange_counts(self, counts):  # pragma: no cover - abstract
        raise NotImplementedError

    def _all_to_all(self, sends, send_splits, recvs, recv_splits):  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


def _offsets(splits):
    return np.concatenate([[0], np.cumsum(splits)]).astype(np.int64)


# --- NCCL --------------------------------------------------------------------------------------
class NcclGroup(Group):
    """R processes, one GPU each, joined by an NCCL communicator (``cupy.cuda.nccl``).

    Collectives are enqueued on CuPy's current stream; arrays travel as bytes (so bf16 and any
    other dtype go unchanged). The all-to-all is grouped point-to-point send/recv (inside
    ``groupStart``/``groupEnd``), one pair per peer and array with a nonzero size; the rank's
    own rows are a device copy. Build it with ``zm.parallel.init()``, or from a unique id:
    ``NcclGroup(rank, world_size, unique_id)`` after selecting the rank's device.
    """

    def __init__(self, rank: int, world_size: int, unique_id):
        if cupy_module() is None:
            raise RuntimeError("NcclGroup needs CuPy (pip install 'zeromoe-cupy[cuda13]'); "
                               "zm.parallel.local_groups runs expert parallelism without it")
        from cupy.cuda import nccl
        if not nccl.available:
            raise RuntimeError("NCCL is not available to CuPy (install nvidia-nccl-cu13 or "
                               "nvidia-nccl-cu12 to match CuPy's CUDA)")
        self._nccl = nccl
        self.rank, self.world_size = int(rank), int(world_size)
        self.comm = _communicator(nccl, self.world_size, unique_id, self.rank)

    def _exchange_counts(self, counts):
        cp = cupy_module()
        send = cp.asarray(counts)
        recv = cp.empty_like(send)
        splits = [1] * self.world_size
        self._all_to_all([send], splits, [recv], splits)
        both = cp.stack([send, recv]).get()  # the one host synchronization
        return both[0], both[1]

    def _all_to_all(self, sends, send_splits, recvs, recv_splits):
        cp = cupy_module()
        nccl = self._nccl
        stream = cp.cuda.get_current_stream().ptr
        so, ro = _offsets(send_splits), _offsets(recv_splits)
        me = self.rank
        runtime = cp.cuda.runtime
        for s, r in zip(sends, recvs):
            if not (is_cupy(s) and is_cupy(r)):
                raise TypeError("sends, recvs: expected CuPy arrays for the NCCL group")
            if send_splits[me]:  # the rank's own rows: a device copy (C-contiguous rows)
                row = s.itemsize * int(np.prod(s.shape[1:]))
                runtime.memcpyAsync(r.data.ptr + int(ro[me]) * row, s.data.ptr + int(so[me]) * row,
                                    int(send_splits[me]) * row, runtime.memcpyDeviceToDevice,
                                    stream)
        nccl.groupStart()
        try:
            for s, r in zip(sends, recvs):
                row = s.itemsize * int(np.prod(s.shape[1:]))  # bytes per row
                for p in range(self.world_size):
                    if p == me:
                        continue
                    if send_splits[p]:
                        self.comm.send(s.data.ptr + int(so[p]) * row, int(send_splits[p]) * row,
                                       nccl.NCCL_INT8, p, stream)
                    if recv_splits[p]:
                        self.comm.recv(r.data.ptr + int(ro[p]) * row, int(recv_splits[p]) * row,
                                       nccl.NCCL_INT8, p, stream)
        finally:
            nccl.groupEnd()


def _communicator(nccl, world_size, unique_id, rank):
    """NcclCommunicator from a unique id as ``get_unique_id`` gave it (bytes in CuPy >= 14, a
    tuple of signed chars before) or as a list of its ints after a JSON round trip."""
    ints = [int(b) for b in unique_id]
    try:
        return nccl.NcclCommunicator(world_size, bytes(b & 0xFF for b in ints), rank)
    except TypeError:  # CuPy < 14 wants the tuple; the check comes before any NCCL call
        return nccl.NcclCommunicator(world_size, tuple(ints), rank)


# --- local threads -----------------------------------------------------------------------------
class _LocalWorld:
    """What the R thread ranks of ``local_groups`` share: posted payloads per call, guarded
    by one condition variable."""

    def __init__(self, world_size: int, timeout: float):
        self.world_size = world_size
        self.timeout = timeout
        self.cond = threading.Condition()
        self.posted: dict[tuple[int, int], list] = {}   # (call, src) -> payload per dst
        self.read: dict[int, int] = {}                  # call -> ranks done reading
        self.failure: str | None = None


class LocalGroup(Group):
    """One rank of R in-process ranks (threads): the same collectives as ``NcclGroup`` on
    NumPy arrays (or CuPy arrays on one GPU), through memory shared by the threads.

    Every wait times out after ``timeout`` seconds with a ``TimeoutError`` naming the ranks
    that did not arrive; ``abort(reason)`` (``run_local`` calls it when a rank raises) makes
    every waiting and later call on the group raise at once, naming the reason.
    """

    def __init__(self, world: _LocalWorld, rank: int):
        self._world = world
        self.rank, self.world_size = rank, world.world_size
        self._calls = 0

    def abort(self, reason: str) -> None:
        w = self._world
        with w.cond:
            if w.failure is None:
                w.failure = f"rank {self.rank}: {reason}"
            w.cond.notify_all()

    def _exchange(self, payload):
        """Post payload[p] for every rank p; return what every rank posted for this one."""
        w, me, R = self._world, self.rank, self.world_size
        call = self._calls
        self._calls += 1
        deadline = time.monotonic() + w.timeout
        with w.cond:
            if w.failure is not None:
                raise RuntimeError(f"local group aborted ({w.failure})")
            w.posted[(call, me)] = payload
            w.cond.notify_all()
            while True:
                missing = [p for p in range(R) if (call, p) not in w.posted]
                if w.failure is not None:
                    raise RuntimeError(f"local group aborted ({w.failure}); rank {me} was "
                                       f"waiting in collective call #{call}")
                if not missing:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    w.failure = (f"rank(s) {missing} did not arrive at collective call #{call} "
                                 f"within {w.timeout:g} s")
                    w.cond.notify_all()
                    raise TimeoutError(f"local group: {w.failure} (rank {me} waited)")
                w.cond.wait(left)
            got = [w.posted[(call, p)][me] for p in range(R)]
            w.read[call] = w.read.get(call, 0) + 1
            if w.read[call] == R:  # the last reader frees the call's payloads
                for p in range(R):
                    del w.posted[(call, p)]
                del w.read[call]
        return got

    def _exchange_counts(self, counts):
        counts = counts.get() if is_cupy(counts) else counts  # host results, as NCCL's
        got = self._exchange([counts[p].copy() for p in range(self.world_size)])
        return counts.copy(), np.stack(got)

    def _all_to_all(self, sends, send_splits, recvs, recv_splits):
        so, ro = _offsets(send_splits), _offsets(recv_splits)
        # Copies: the sender may free or reuse its buffers before the others have read them.
        payload = [[s[so[p]:so[p + 1]].copy() for s in sends] for p in range(self.world_size)]
        got = self._exchange(payload)
        for p, arrays in enumerate(got):
            for i, (a, r) in enumerate(zip(arrays, recvs)):
                if a.shape[0] != recv_splits[p] or type(a) is not type(r):
                    raise ValueError(f"recvs[{i}]: rank {p} sent {a.shape[0]} rows of "
                                     f"{type(a).__module__} arrays, expected {recv_splits[p]} "
                                     f"of {type(r).__module__}")
                r[ro[p]:ro[p + 1]] = a


def local_groups(world_size: int, timeout: float = DEFAULT_TIMEOUT_S) -> list[LocalGroup]:
    """``world_size`` group objects for as many threads of this process (rank p uses the
    p-th). ``timeout``: seconds a collective waits for the other ranks before it raises."""
    world_size = check_int("world_size", world_size, 1)
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout: expected a positive number of seconds, got "
                        f"{type(timeout).__name__} {timeout!r}")
    if not timeout > 0:  # NaN too
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    world = _LocalWorld(world_size, float(timeout))
    return [LocalGroup(world, r) for r in range(world_size)]


def run_local(fn, world_size: int, timeout: float = DEFAULT_TIMEOUT_S) -> list:
    """Run ``fn(group)`` on ``world_size`` threads, one per rank of ``local_groups``; return
    the results in rank order. A rank that raises aborts the group (the others stop waiting
    at once, each with a RuntimeError naming the abort), and the exception of the rank that
    failed first is raised again here, the same object (so ``except ValueError`` sees a
    ValueError), with a note naming its rank (Python 3.11+; chained on older Pythons)."""
    groups = local_groups(world_size, timeout)
    results: list = [None] * world_size
    errors: list = [None] * world_size
    failed: list[int] = []  # ranks in the order their errors were caught
    lock = threading.Lock()

    def body(g):
        try:
            results[g.rank] = fn(g)
        except BaseException as exc:  # noqa: BLE001 - reported below
            with lock:
                errors[g.rank] = exc
                failed.append(g.rank)
            g.abort(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=body, args=(g,), daemon=True) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not failed:
        return results
    # The rank that failed first: its error is not an abort seen by the others (they raise
    # after it, but a rank that timed out races with the ranks it woke).
    first = min(failed, key=lambda r: (_is_abort(errors[r]), failed.index(r)))
    exc = errors[first]
    note = f"rank {first} of {world_size} (run_local) raised this"
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(note)
    elif exc.__cause__ is None:
        exc.__cause__ = RuntimeError(note)
    raise exc


def _is_abort(exc) -> bool:
    return isinstance(exc, RuntimeError) and "local group aborted" in str(exc)
