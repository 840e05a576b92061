"""Ranks from the launcher's environment, the NCCL rendezvous, and ``zeromoe launch``.

``init()`` reads the variables that torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), mpirun (OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK) or srun (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID) set, selects the GPU, and passes rank 0's NCCL unique id to the
others over one TCP connection each to MASTER_ADDR:MASTER_PORT (the standard library's
sockets; no torch). ``launch(n, argv)`` starts n such processes on this host.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, NamedTuple, Sequence

from .._arrays import check_int

DEFAULT_RENDEZVOUS_TIMEOUT_S = 120.0

# (rank, world size, local rank) variable names, in the order they are looked for.
_LAUNCHERS = (
    ("torchrun / zeromoe launch", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpirun (Open MPI)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("srun (Slurm)", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


class RankInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _int_var(env, name):
    value = env.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an integer in the environment, got {value!r}") \
            from None


def rank_info(env: Mapping[str, str] | None = None) -> RankInfo:
    """This process's rank, world size, local rank and rendezvous address, from ``env``
    (default os.environ). ValueError naming the variables when they are missing or wrong.

    The rendezvous port is ZEROMOE_RENDEZVOUS_PORT if set, else MASTER_PORT, or MASTER_PORT + 1
    under torchrun (TORCHELASTIC_* variables set), whose agent's store listens on MASTER_PORT.
    """
    env = os.environ if env is None else env
    for _, rank_var, size_var, local_var in _LAUNCHERS:
        if rank_var in env and size_var in env:
            rank, world = _int_var(env, rank_var), _int_var(env, size_var)
            local = _int_var(env, local_var) if local_var in env else rank
            break
    else:
        names = "; ".join(f"{n}: {r}, {s}, {lr}" for n, r, s, lr in _LAUNCHERS)
        raise ValueError(f"no launcher variables in the environment: expected one of ({names}); "
                         f"start the script with `zeromoe launch -n N`, torchrun, mpirun or srun")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank}, world size {world}: expected 0 <= rank < world size")
    if local < 0:
        raise ValueError(f"local rank: expected >= 0, got {local}")
    addr = env.get("MASTER_ADDR")
    port = env.get("MASTER_PORT")
    if world > 1 and (not addr or not port):
        raise ValueError("MASTER_ADDR, MASTER_PORT: expected both in the environment (rank 0's "
                         "host and a free TCP port, e.g. `mpirun -x MASTER_ADDR=node0 -x "
                         f"MASTER_PORT=29500`), got {addr!r} and {port!r}")
    port_n = _int_var(env, "MASTER_PORT") if port else 0
    if any(k.startswith("TORCHELASTIC_") for k in env):
        port_n += 1
    if "ZEROMOE_RENDEZVOUS_PORT" in env:
        port_n = _int_var(env, "ZEROMOE_RENDEZVOUS_PORT")
    if world > 1 and not 0 < port_n < 65536:  # else the socket's own error, far from the cause
        name = "ZEROMOE_RENDEZVOUS_PORT" if "ZEROMOE_RENDEZVOUS_PORT" in env else "MASTER_PORT"
        raise ValueError(f"{name}: expected a TCP port in [1, 65535] (the rendezvous port), "
                         f"got {port_n}")
    return RankInfo(rank, world, local, addr or "127.0.0.1", port_n)


def _send_message(conn, payload: bytes):
    conn.sendall(len(payload).to_bytes(8, "little") + payload)


def _recv_message(conn) -> bytes:
    def exactly(n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("rendezvous: the peer closed the connection")
            buf += chunk
        return buf
    return exactly(int.from_bytes(exactly(8), "little"))


def rendezvous(info: RankInfo, payload=None, timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT_S):
    """Rank 0 sends ``payload`` (JSON-able) to every other rank; each returns it.

    Rank 0 listens on ``info.master_port`` on every interface (MASTER_PORT, or MASTER_PORT + 1
    under torchrun, or ZEROMOE_RENDEZVOUS_PORT; see ``rank_info``) and waits for the
    world_size - 1 others, which connect to MASTER_ADDR with retries. Either side raises TimeoutError naming the address after
    ``timeout`` seconds.
    """
    addr, port = info.master_addr, info.master_port
    deadline = time.monotonic() + timeout
    if info.world_size == 1:
        return payload
    if info.rank == 0:
        data = json.dumps(payload).encode()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                server.bind(("", port))
            except OSError as exc:
                raise OSError(f"rendezvous: rank 0 cannot listen on port {port} ({exc}); "
                              f"choose another MASTER_PORT") from exc
            server.listen(info.world_size)
            for served in range(info.world_size - 1):
                left = deadline - time.monotonic()
                server.settimeout(max(0.01, left))
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    raise TimeoutError(f"rendezvous: rank 0 heard from {served} of "
                                       f"{info.world_size - 1} ranks on {addr}:{port} within "
                                       f"{timeout:g} s") from None
                with conn:
                    _send_message(conn, data)
        return payload
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=5) as conn:
                conn.settimeout(max(1.0, deadline - time.monotonic()))
                return json.loads(_recv_message(conn).decode())
        except OSError as exc:  # not listening yet: retry
            last = exc
            time.sleep(0.1)
    raise TimeoutError(f"rendezvous: rank {info.rank} could not reach rank 0 at {addr}:{port} "
                       f"within {timeout:g} s (last error: {last})")


def init(timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT_S):
    """The NCCL group of this process, from the launcher's environment (``rank_info``).

    Selects GPU LOCAL_RANK (device 0 when the launcher left each process one visible GPU),
    makes rank 0's NCCL unique id known to every rank (``rendezvous``), and builds the
    communicator (collective: every rank must call it). Returns a ``NcclGroup``.
    """
    from .._arrays import cupy_module, gpu_available
    from .group import NcclGroup
    info = rank_info()
    if not gpu_available():
        raise RuntimeError("zm.parallel.init(): no CUDA GPU is visible to CuPy; for ranks "
                           "without GPUs use zm.parallel.local_groups(world_size)")
    cp = cupy_module()
    count = cp.cuda.runtime.getDeviceCount()
    if count == 1:
        device = 0
    elif info.local_rank < count:
        device = info.local_rank
    else:
        raise ValueError(f"local rank {info.local_rank}: expected < the {count} visible GPUs")
    cp.cuda.Device(device).use()
    from cupy.cuda import nccl
    uid = list(nccl.get_unique_id()) if info.rank == 0 else None
    uid = rendezvous(info, uid, timeout)
    return NcclGroup(info.rank, info.world_size, uid)


# --- zeromoe launch ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpus_seen() -> int | None:
    """The GPUs CuPy sees in this process (CUDA_VISIBLE_DEVICES applied); None without a
    usable GPU."""
    from .._arrays import cupy_module, gpu_available
    return cupy_module().cuda.runtime.getDeviceCount() if gpu_available() else None


def _check_gpus(nprocs: int, visible_devices: str | None, name: str = "nprocs (-n)") -> None:
    """One GPU per rank: more ranks than visible GPUs is a ValueError before any rank starts
    (two ranks on one GPU fail later inside NCCL). Without a GPU the ranks still start (a
    script may only use ``rank_info`` / ``rendezvous``), after a note on stderr."""
    count = _gpus_seen()
    if count is None:
        from .._arrays import gpu_unavailable_reason
        print(f"zeromoe launch: no usable CUDA GPU ({gpu_unavailable_reason()}); starting the "
              f"{nprocs} ranks anyway, but zm.parallel.init() needs one GPU per rank (ranks on "
              f"the CPU: zm.parallel.local_groups({nprocs}) in one process)", file=sys.stderr,
              flush=True)
        return
    if nprocs > count:
        where = "" if visible_devices is None else f" (CUDA_VISIBLE_DEVICES={visible_devices!r})"
        raise ValueError(f"{name}: {nprocs} ranks asked for, but {count} GPU(s) are "
                         f"visible{where}; expected at most {count}, one GPU per rank")


def launch(nprocs: int, argv: Sequence[str], prefix: bool = True,
           env: Mapping[str, str] | None = None) -> int:
    """Run ``python argv...`` as ``nprocs`` ranks on this host, with RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (127.0.0.1) and MASTER_PORT (a free port) set.

    Each rank gets one GPU (``init()`` selects GPU LOCAL_RANK): ``nprocs`` above the GPUs
    CuPy sees here (CUDA_VISIBLE_DEVICES applied) is a ValueError naming both numbers, raised
    before any rank starts; without a usable GPU the ranks start after a note on stderr.
    (Not checked when ``env`` sets another CUDA_VISIBLE_DEVICES than this process's.)
    A script that does not exist is a FileNotFoundError naming it, also raised before.

    Output lines are prefixed with ``[rank r]`` (``prefix=False``: passed through). Returns 0
    when every rank exits with 0; when one fails, the others are terminated and its exit
    status is returned (1 if it was a signal).
    """
    nprocs = check_int("nprocs", nprocs, 1)
    if not argv:
        raise ValueError("argv: expected a script (and its arguments), got nothing")
    if not argv[0].startswith("-") and not os.path.exists(argv[0]):  # not -c / -m: a path
        raise FileNotFoundError(f"{argv[0]}: no such script (checked before starting "
                                f"{nprocs} ranks that would each fail on it)")
    base = dict(os.environ if env is None else env)
    visible = base.get("CUDA_VISIBLE_DEVICES")
    if visible == os.environ.get("CUDA_VISIBLE_DEVICES"):  # the ranks see what we see
        _check_gpus(nprocs, visible)
    port = str(free_port())
    procs, pumps = [], []
    for r in range(nprocs):
        e = dict(base, RANK=str(r), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(r),
                 LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                 PYTHONUNBUFFERED="1")
        out = subprocess.PIPE if prefix else None
        p = subprocess.Popen([sys.executable, *argv], env=e, stdout=out,
                             stderr=subprocess.STDOUT if prefix else None)
        procs.append(p)
        if prefix:
            t = threading.Thread(target=_pump, args=(p.stdout, f"[rank {r}] "), daemon=True)
            t.start()
            pumps.append(t)
    status = 0
    try:
        running = set(range(nprocs))
        while running:
            for r in sorted(running):
                code = procs[r].poll()
                if code is None:
                    continue
                running.discard(r)
                if code != 0 and status == 0:
                    status = code if code > 0 else 1
                    print(f"zeromoe launch: rank {r} exited with status {code}; stopping the "
                          f"others", file=sys.stderr, flush=True)
                    _terminate([procs[q] for q in running])
            time.sleep(0.05)
    except KeyboardInterrupt:
        _terminate(procs)
        status = 130
    for t in pumps:
        t.join(timeout=5)
    return status


def _pump(stream, prefix):
    for line in iter(stream.readline, b""):
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()
    stream.close()


def _terminate(procs, grace: float = 5.0):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
