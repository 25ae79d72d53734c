"""Starting a group of processes that train together, from a script, a test or a notebook.

``launch(fn, world_size)`` runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh
processes joined into one ``torch.distributed`` process group (gloo on CPU, NCCL when there
is one GPU per process), on a free port chosen at run time, and returns the list of the
ranks' return values. If any rank raises or dies, every other rank is stopped within a bounded
time and ``RankFailedError`` reports which rank failed and why; nothing hangs.

For a job that ``torchrun`` starts instead (one node: ``torchrun --nproc-per-node 2 train.py``;
several nodes: ``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d
--rdzv-endpoint HOST:PORT train.py`` on each node), call ``init_from_env()`` in the script.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import sys
import time
import traceback
from typing import Any, Callable

#: Seconds a collective may wait for the other ranks before it fails (instead of hanging).
DEFAULT_COLLECTIVE_TIMEOUT = 120.0


class RankFailedError(RuntimeError):
    """One or more ranks of a launched group raised, died or ran out of time."""

    def __init__(self, message: str, failures: dict[int, str]):
        super().__init__(message)
        self.failures = failures  # rank -> what happened to it


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in its group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: Any  # torch.device the rank computes on


def free_port() -> int:
    """A TCP port on this host that nothing listens on right now (asked from the OS, never fixed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(world_size: int | None = None) -> str:
    """'nccl' when CUDA has at least one GPU per process, else 'gloo'."""
    import torch

    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        if world_size is None or torch.cuda.device_count() >= world_size:
            return "nccl"
    return "gloo"


def init_process_group(rank: int, world_size: int, backend: str | None = None,
                       timeout: float = DEFAULT_COLLECTIVE_TIMEOUT, local_rank: int | None = None) -> DistInfo:
    """Join the group described by MASTER_ADDR / MASTER_PORT, with a collective timeout.

    With NCCL the process first selects GPU ``local_rank`` and turns on NCCL's asynchronous
    error handling, so a collective that waits longer than ``timeout`` seconds aborts the
    process with an error instead of blocking forever.
    """
    import torch
    import torch.distributed as dist

    backend = backend or default_backend(world_size)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: expected 'gloo' or 'nccl'")
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank={rank!r}, world_size={world_size!r}: expected 0 <= rank < world_size")
    local_rank = rank if local_rank is None else local_rank
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    kwargs = dict(backend=backend, rank=rank, world_size=world_size,
                  timeout=datetime.timedelta(seconds=timeout))
    if backend == "nccl":
        kwargs["device_id"] = device  # binds the communicator to this GPU eagerly
    dist.init_process_group(**kwargs)
    return DistInfo(rank, world_size, local_rank, backend, device)


def init_from_env(backend: str | None = None, timeout: float = DEFAULT_COLLECTIVE_TIMEOUT) -> DistInfo:
    """Join the group that ``torchrun`` (or ``launch``) described in RANK, WORLD_SIZE, LOCAL_RANK.

    Without those variables this is a single process: returns rank 0 of 1 without creating a group.
    Inside a group that already exists (a function run by ``launch``), describes that group.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        backend = dist.get_backend()
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return DistInfo(0, 1, 0, "none", device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return init_process_group(rank, world, backend, timeout, local_rank)


def _worker(fn, rank, world_size, backend, port, timeout, args, kwargs, conn):
    """Body of one launched process: join the group, run ``fn``, send back the result or the error."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    status, payload = "ok", None
    try:
        import torch
        import torch.distributed as dist

        if backend == "gloo":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        init_process_group(rank, world_size, backend, timeout)
        payload = fn(rank, world_size, *args, **kwargs)
        data = pickle.dumps(payload)
    except BaseException as err:  # noqa: BLE001 - everything is reported to the parent
        status = "error"
        data = pickle.dumps(f"{type(err).__name__}: {err}\n\n" + traceback.format_exc())
    try:
        conn.send_bytes(pickle.dumps((status, data)))
        conn.close()
    except (BrokenPipeError, OSError):
        pass
    if status == "ok":
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the result is already delivered
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave at once: a failed rank must not wait in a group's shutdown for peers that may hang.
    os._exit(0 if status == "ok" else 1)


def _start_method(backend: str, start_method: str | None) -> str:
    if start_method is not None:
        return start_method
    # CUDA cannot be used in a forked child once the parent touched it, so GPUs always spawn.
    # On CPU, fork lets a notebook launch functions it defined itself (spawn must import them).
    if backend == "gloo" and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"


def launch(fn: Callable[..., Any], world_size: int = 2, *args: Any, backend: str | None = None,
           timeout: float = DEFAULT_COLLECTIVE_TIMEOUT, grace: float | None = None,
           deadline: float | None = None, start_method: str | None = None, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; return their results.

    backend: 'gloo' or 'nccl'; default NCCL when there is a GPU per process, else gloo.
    timeout: seconds any collective may wait for a peer before it fails.
    grace: seconds the other ranks get to finish after one rank fails, before they are
        terminated (default ``timeout + 10``). So a failure ends the whole launch within
        about ``grace`` seconds.
    deadline: optional limit in seconds on the whole launch.
    start_method: 'fork' or 'spawn' (default: fork for gloo where available, spawn for NCCL;
        with spawn, ``fn`` must be importable, i.e. defined in a module, not in a notebook).

    Raises ``RankFailedError`` naming the failed ranks, their errors and tracebacks.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: expected a positive integer")
    if timeout <= 0:
        raise ValueError(f"timeout={timeout!r}: expected a positive number of seconds")
    backend = backend or default_backend(world_size)
    method = _start_method(backend, start_method)
    if method == "spawn" and getattr(fn, "__module__", None) == "__main__" and "ipykernel" in sys.modules:
        raise ValueError(f"{fn.__name__} is defined in the notebook, which spawned processes cannot import; "
                         "move it into a module, or use backend='gloo' with start_method='fork'")
    grace = timeout + 10.0 if grace is None else grace
    if method == "fork":
        # Forked children inherit the parent's imports: load once here what torch imports lazily
        # on first use (an optimizer's constructor imports torch._dynamo, seconds of work), so
        # that each launch does not pay for it again in every child.
        import torch._dynamo  # noqa: F401
    ctx = multiprocessing.get_context(method)
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, name=f"lmcore-rank{rank}",
                        args=(fn, rank, world_size, backend, port, timeout, args, kwargs, send))
        p.start()
        send.close()
        procs.append(p)
        conns.append(recv)
    return _collect(procs, conns, grace, deadline)


def _collect(procs, conns, grace, deadline) -> list[Any]:
    """Wait for every rank; after the first failure give the rest ``grace`` seconds, then stop them."""
    world_size = len(procs)
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    done: set[int] = set()
    deadline_at = time.monotonic() + deadline if deadline is not None else float("inf")
    grace_at = float("inf")  # set when the first rank fails
    try:
        while len(done) < world_size:
            now = time.monotonic()
            if now >= min(deadline_at, grace_at):
                why = (f"still running {grace:g} s after another rank failed" if grace_at <= deadline_at
                       else f"still running at the launch deadline of {deadline:g} s")
                for r in sorted(set(range(world_size)) - done):
                    failures[r] = f"{why}; terminated"
                break
            pending = [r for r in range(world_size) if r not in done]
            waitables = [conns[r] for r in pending] + [procs[r].sentinel for r in pending]
            ready = multiprocessing.connection.wait(waitables, timeout=min(0.5, min(deadline_at, grace_at) - now))
            for r in pending:
                if not any(x is conns[r] or x == procs[r].sentinel for x in ready):
                    continue
                message = None
                try:
                    if conns[r].poll():
                        message = pickle.loads(conns[r].recv_bytes())
                except (EOFError, OSError):
                    message = None
                if message is None:
                    procs[r].join(1.0)
                    failures[r] = f"died without a result (exit code {procs[r].exitcode})"
                elif message[0] == "ok":
                    results[r] = pickle.loads(message[1])
                else:
                    failures[r] = pickle.loads(message[1])
                done.add(r)
                if failures and grace_at == float("inf"):
                    grace_at = time.monotonic() + grace  # the others now have `grace` seconds
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
        for c in conns:
            c.close()
    if failures:
        first = min(failures, key=lambda r: (_blame_order(failures[r]), r))
        if _blame_order(failures[first]) == 1:  # nobody raised or died: the rank still running stalled
            lines = [f"rank {first} of {world_size} stalled (the others timed out waiting for it in a "
                     f"collective): {failures[first]}"]
        else:
            lines = [f"rank {first} of {world_size} failed: {failures[first]}"]
        for r in sorted(failures):
            if r != first:
                head = failures[r].strip().splitlines()[0] if failures[r].strip() else ""
                lines.append(f"rank {r} then stopped: {head}")
        raise RankFailedError("\n".join(lines), failures)
    return [results[r] for r in range(world_size)]


def _blame_order(text: str) -> int:
    """0: the rank raised or died; 1: it was still running when stopped (it stalled); 2: it failed
    because of another rank (a broken or timed-out collective). The lowest is reported first."""
    if not _is_consequence(text):
        return 0
    return 1 if text.startswith("still running") else 2


def _is_consequence(text: str) -> bool:
    """True when a rank's failure looks caused by another rank's (a broken or timed-out collective)."""
    text = text.lower()
    return any(s in text for s in ("connection closed", "connection reset", "timed out", "timeout",
                                    "terminated", "broken pipe", "peer", "nccl communicator was aborted"))
