"""Run a function on N local gloo CPU processes, for tests: bounded, and loud on failure.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes, initialises
the default gloo group in each (a file store in a fresh temporary directory, so no
port is needed) with ``pg_timeout_s``, calls ``fn(*args)`` and returns the values
per rank. A rank that raises makes ``run_ranks`` raise ``RankProcessError`` with
that rank and its traceback; the other ranks get ``grace_s`` to finish (to report
their own errors) and are then terminated. Nothing waits longer than ``timeout_s``.
``spawn_ranks`` does the same but returns every rank's ``RankResult`` instead of
raising, for tests of failures.

Processes are started from a forkserver that has imported torch (and torch._dynamo,
which the first optimizer imports) and tripar's API and engine once, so a start costs a
fork, not an interpreter and seconds of imports. Each rank computes with one
thread (``OMP_NUM_THREADS=1``): the ranks share the machine's cores. ``fn`` must be
a module-level function; test modules imported by pytest's importlib mode are
found again by their file.

This harness is not part of the package. Each rank imports it as ``tests._ranks``
(its entry point travels by name), so the repository root must be on ``sys.path``:
pytest puts it there (``pythonpath`` in pyproject.toml), the ranks inherit the
parent's ``sys.path``, and benchmarks insert the root before importing it.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing as mp

from tripar.runtime.launch import exit_reason

__all__ = ["RankProcessError", "RankResult", "run_ranks", "spawn_ranks"]


@dataclass(frozen=True, slots=True)
class RankResult:
    """How one rank ended."""

    rank: int
    ok: bool
    value: Any = None
    error: str | None = None
    """``ExceptionType: message`` of what it raised, or why it was stopped."""
    traceback: str | None = None
    seconds: float = 0.0
    """From the start of all ranks to this rank's end."""


class RankProcessError(RuntimeError):
    """A rank of ``run_ranks`` failed; ``results`` holds every rank's outcome."""

    def __init__(self, message: str, results: list[RankResult]) -> None:
        super().__init__(message)
        self.results = results


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0,
              pg_timeout_s: float = 30.0, grace_s: float = 2.0) -> list[Any]:
    """``fn(*args)`` on ``world_size`` gloo ranks; every rank's return value, by rank."""
    results = spawn_ranks(fn, world_size, *args, timeout_s=timeout_s,
                          pg_timeout_s=pg_timeout_s, grace_s=grace_s)
    failed = [r for r in results if not r.ok]
    if failed:
        first = min(failed, key=lambda r: r.seconds)
        others = "; ".join(f"rank {r.rank}: {r.error}" for r in failed if r is not first)
        raise RankProcessError(
            f"rank {first.rank} of {world_size} failed: {first.error}\n{first.traceback or ''}"
            + (f"\nthen {others}" if others else ""), results)
    return [r.value for r in results]


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0,
                pg_timeout_s: float = 30.0, grace_s: float = 2.0) -> list[RankResult]:
    """Like ``run_ranks`` but returns each rank's ``RankResult`` and never raises for a rank."""
    _check_importable()
    ctx = _context()
    ref = (fn.__module__, fn.__qualname__, inspect.getfile(fn))
    tmp = tempfile.mkdtemp(prefix="tripar-ranks-")
    init = f"file://{os.path.join(tmp, 'store')}"
    procs, conns = [], []
    start = time.monotonic()
    try:
        for rank in range(world_size):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child_main, daemon=True,
                            args=(rank, world_size, init, pg_timeout_s, ref, args, child))
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        return _collect(procs, conns, start, timeout_s, grace_s)
    finally:
        for p in procs:
            _stop(p)
        for c in conns:
            c.close()
        shutil.rmtree(tmp, ignore_errors=True)


_OPTIONAL_PRELOAD = ("transformers", "transformers.models.gpt2.modeling_gpt2",
                     "transformers.models.llama.modeling_llama",
                     "transformers.models.bert.modeling_bert")
"""transformers and the model code the tests build from it (about 3 s of imports per
process otherwise); the forkserver skips any that is not installed."""


def _check_importable() -> None:
    """Each rank imports this module by name: say so here rather than lose every rank."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in {os.path.abspath(p) for p in sys.path}:
        raise RuntimeError(
            f"the ranks import this harness as {__name__!r}, which needs {root} on sys.path; "
            "run pytest in the repository (pyproject.toml's pythonpath adds it) or insert it"
        )


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    # torch._dynamo is what the first optimizer construction imports (seconds); load it, and
    # what auto_parallel imports, once.
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "torch.optim",
                                "tripar.api", "tripar.runtime.engine", *_OPTIONAL_PRELOAD])
    return ctx


def _collect(procs: list, conns: list[Connection], start: float, timeout_s: float,
             grace_s: float) -> list[RankResult]:
    n = len(procs)
    results: dict[int, RankResult] = {}
    deadline = start + timeout_s
    waiting = {conns[r]: r for r in range(n)}
    while waiting:
        now = time.monotonic()
        if now >= deadline:
            break
        for conn in wait(list(waiting), timeout=deadline - now):
            rank = waiting.pop(conn)
            try:
                status, *payload = conn.recv()
            except (EOFError, OSError):
                procs[rank].join(1.0)
                results[rank] = RankResult(rank, False, error=f"the process "
                                           f"{exit_reason(procs[rank].exitcode)} without "
                                           f"reporting", seconds=time.monotonic() - start)
            else:
                if status == "ok":
                    results[rank] = RankResult(rank, True, payload[0],
                                               seconds=time.monotonic() - start)
                else:
                    results[rank] = RankResult(rank, False, error=payload[0],
                                               traceback=payload[1],
                                               seconds=time.monotonic() - start)
            if not results[rank].ok:
                deadline = min(deadline, time.monotonic() + grace_s)
    for rank in waiting.values():
        why = ("stopped: another rank failed and it did not finish within the grace period"
               if any(not r.ok for r in results.values())
               else "stopped: the run passed its timeout")
        results[rank] = RankResult(rank, False, error=why, seconds=time.monotonic() - start)
    return [results[r] for r in range(n)]


def _stop(p: Any) -> None:
    if p.is_alive():
        p.terminate()
        p.join(1.0)
    if p.is_alive():
        p.kill()
        p.join(1.0)


def _resolve(ref: tuple[str, str, str]) -> Callable[..., Any]:
    module_name, qualname, path = ref
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            assert spec is not None and spec.loader is not None, f"cannot load {path}"
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _child_main(rank: int, world_size: int, init: str, pg_timeout_s: float,
                ref: tuple[str, str, str], args: tuple, conn: Connection) -> None:
    from tripar.runtime.launch import child_exit, no_process_locks

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    no_process_locks()
    code = 1
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        value = _resolve(ref)(*args)
        dist.barrier(async_op=True).wait(datetime.timedelta(seconds=pg_timeout_s))
        conn.send(("ok", value))
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except Exception:  # noqa: BLE001 - the parent is gone or the error does not pickle
            pass
    finally:
        conn.close()
        child_exit(code)
