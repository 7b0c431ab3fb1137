"""Starting a job: under torchrun (env://), in one process, or as N local CPU processes.

``ensure_process_group`` is what ``auto_parallel`` calls: it uses an initialised
default group, or initialises one from torchrun's environment (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``: one node or a multi-node
rendezvous), or, for a job of one device, a private single-process gloo group.

``launch_local(fn, nproc, *args)`` is what ``tripar train --nproc N`` runs: N local
processes on gloo (a file store in a temporary directory, no port), each calling
``fn(*args)``. A rank may send progress messages to the launcher with ``report``
(``on_message`` receives them, e.g. to draw a progress bar). A rank that raises or dies
makes the launcher raise ``LaunchError`` naming it (its traceback in
``LaunchError.traceback``), after giving the other ranks ``grace_s`` to stop on their
own (their runtime raises within the process-group timeout, naming the failed rank);
whatever is left is terminated. A user error (a ``TriparError`` such as ``ConfigError``
or ``PlanError``, e.g. a bad pin or a corrupt checkpoint) is raised again in the
launcher as itself, so ``tripar train`` reports it as the Python API does. A
KeyboardInterrupt in the launcher (Ctrl-C reaches every local process) terminates
every local process before it propagates.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist

from tripar.errors import ConfigError, TriparError
from tripar.partitioner import Cluster

__all__ = ["LaunchError", "ensure_process_group", "job_cluster", "launch_local", "report"]


class LaunchError(TriparError, RuntimeError):
    """A local rank failed; the message names it, ``traceback`` is the rank's traceback."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback


def ensure_process_group(devices: int | None = None, *, timeout_s: float = 300.0) -> int:
    """The world size of this job, initialising the default process group if needed.

    ``devices``: the size the caller expects (None: whatever the job is). Every group
    created has ``timeout_s``. NCCL when CUDA is available under torchrun, gloo otherwise.
    """
    if devices is not None and (not isinstance(devices, int) or isinstance(devices, bool)
                                or devices < 1):
        raise ConfigError(f"devices must be a positive int, a Cluster or None, got {devices!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        env = os.environ
        if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        elif devices in (None, 1):
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        else:
            raise ConfigError(
                f"devices={devices} needs a job of {devices} processes: start it with "
                f"`torchrun --nproc-per-node {devices} script.py`, or `tripar train --nproc "
                f"{devices}`, or initialise torch.distributed before calling auto_parallel")
    world = dist.get_world_size()
    if devices is not None and devices != world:
        raise ConfigError(f"devices={devices}, but the job has {world} ranks; pass "
                          f"devices=None to use the whole job, or start {devices} ranks")
    return world


# ---- local processes ---------------------------------------------------------------------

_CONN: list[Connection] = []  # the running rank's pipe to its launcher (a child process only)


def job_cluster(world: int, cluster: Cluster | None = None) -> Cluster:
    """The devices of this job as the planner sees them: ``cluster`` when given (checked to
    have ``world`` devices), else a built-in profile for the job's device (``cpu``, or the
    CUDA GPU under NCCL) with ``LOCAL_WORLD_SIZE`` ranks a node."""
    if cluster is None:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if world % per_node:
            per_node = world
        kind = "cpu"
        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            name = torch.cuda.get_device_name().lower()
            kind = next((k for key, k in (("h200", "h200"), ("h100", "h100-80g"),
                                          ("a100", "a100-80g"), ("v100", "v100-32g"))
                         if key in name), "")
            if not kind:
                raise ConfigError(f"no built-in profile for GPU {name!r}; pass cluster= "
                                  f"(tripar calibrate writes one)")
        cluster = Cluster.builtin(kind, nodes=world // per_node, gpus_per_node=per_node)
    if cluster.devices != world:
        raise ConfigError(f"the cluster has {cluster.devices} devices but the job has {world} "
                          f"ranks; start {cluster.devices} ranks or describe the job's devices")
    return cluster


def report(message: Any) -> None:
    """Send ``message`` (picklable) to the launcher's ``on_message``; no-op outside it."""
    if _CONN:
        try:
            _CONN[0].send(("msg", message))
        except (OSError, ValueError):
            pass


def _context() -> Any:
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.optim"])
    return ctx


def _child(rank: int, world: int, init: str, timeout_s: float, threads: int,
           fn: Callable[..., Any], args: tuple, conn: Connection) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    _CONN.append(conn)
    no_process_locks()
    code = 1
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        value = fn(*args)
        conn.send(("ok", value))
        code = 0
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(),
                       user_error(exc)))
        except Exception:  # noqa: BLE001 - the launcher is gone
            pass
    finally:
        conn.close()
        child_exit(code)


def no_process_locks() -> None:
    """Keep libraries from making multiprocessing semaphores in a rank (tqdm's lock, which
    ``torch.fx.Interpreter`` creates): a rank ends with ``os._exit`` or a signal, and its
    semaphores would be reported as leaked when the launcher exits."""
    try:
        import threading

        import tqdm

        tqdm.tqdm.set_lock(threading.RLock())
    except Exception:  # noqa: BLE001 - no tqdm, nothing to do
        pass


def child_exit(code: int) -> None:
    """End a rank process at once: flush its output, release what multiprocessing made."""
    import multiprocessing.util

    try:
        multiprocessing.util._run_finalizers(0)
    except Exception:  # noqa: BLE001 - exiting anyway
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def user_error(exc: BaseException) -> TriparError | None:
    """``exc`` if it is a user error the launcher should raise again as itself (a picklable
    TriparError that is not another rank's failure), else None."""
    from tripar.runtime.mesh import CommError, RankFailedError

    if not isinstance(exc, TriparError) or isinstance(exc, (RankFailedError, CommError,
                                                            LaunchError)):
        return None
    try:
        import pickle

        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - sent as text only
        return None
    return exc


def exit_reason(code: int | None) -> str:
    """``exited with code 3`` or ``was killed by signal SIGKILL``, for a process exit code.

    >>> exit_reason(-9), exit_reason(3)
    ('was killed by signal SIGKILL', 'exited with code 3')
    """
    if code is not None and code < 0:
        import signal

        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch_local(fn: Callable[..., Any], nproc: int, *args: Any, timeout_s: float = 300.0,
                 threads: int = 1, on_message: Callable[[int, Any], None] | None = None,
                 grace_s: float = 10.0) -> list[Any]:
    """Run ``fn(*args)`` on ``nproc`` local gloo processes; each rank's return value.

    ``timeout_s`` is the process groups' timeout (every wait between ranks is bounded
    by it); ``threads`` the compute threads per rank; ``fn`` must be importable (a
    module-level function).
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc must be a positive integer, got {nproc!r}")
    ctx = _context()
    tmp = tempfile.mkdtemp(prefix="tripar-launch-")
    init = f"file://{os.path.join(tmp, 'store')}"
    procs, conns = [], []
    try:
        for rank in range(nproc):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, daemon=True,
                            args=(rank, nproc, init, timeout_s, threads, fn, args, child))
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        return _collect(procs, conns, on_message, grace_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
        for c in conns:
            c.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _collect(procs: list, conns: list[Connection], on_message: Callable | None,
             grace_s: float) -> list[Any]:
    values: dict[int, Any] = {}
    errors: dict[int, tuple[str, str, TriparError | None]] = {}
    waiting = {conns[r]: r for r in range(len(procs))}
    deadline = None
    while waiting:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait(list(waiting), timeout=timeout)
        if not ready:
            break
        for conn in ready:
            rank = waiting[conn]
            try:
                kind, *payload = conn.recv()
            except (EOFError, OSError):
                procs[rank].join(1.0)
                errors[rank] = (f"the process {exit_reason(procs[rank].exitcode)} without "
                                "reporting an error", "", None)
                del waiting[conn]
            else:
                if kind == "msg":
                    if on_message is not None:
                        on_message(rank, payload[0])
                    continue
                del waiting[conn]
                if kind == "ok":
                    values[rank] = payload[0]
                else:
                    errors[rank] = (payload[0], payload[1], payload[2])
            if errors and deadline is None:
                deadline = time.monotonic() + grace_s
    if errors or waiting:
        first = min(errors) if errors else min(waiting.values())
        why, tb, user = errors.get(first, ("stopped", "", None))
        # the rank whose error is not a RankFailedError/CommError is the one that failed first
        for rank, (text, trace, exc) in sorted(errors.items()):
            if not text.startswith(("RankFailedError", "CommError")):
                first, why, tb, user = rank, text, trace, exc
                break
        if user is not None:
            raise user  # a user error: the same exception the Python API raises
        others = "; ".join(f"rank {r}: {e[0].splitlines()[0][:300]}"
                           for r, e in sorted(errors.items()) if r != first)
        stopped = sorted(waiting.values())
        raise LaunchError(f"rank {first} of {len(procs)} failed: {why}"
                          + (f"\nthen {others}" if others else "")
                          + (f"\nranks {stopped} were stopped" if stopped else "")
                          + (f"\n(rank {first}'s traceback: LaunchError.traceback, or "
                             f"`tripar --debug ...`)" if tb else ""), traceback=tb)
    return [values[r] for r in range(len(procs))]
