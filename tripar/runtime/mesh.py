"""The (pp, dp, tp) device mesh of a training job, and bounded, fault-aware waiting.

``build_mesh`` lays the world out as ``torch.distributed.device_mesh.init_device_mesh``
does, with axes ``("pp", "dp", "tp")`` and tp innermost: global rank
``(p * dp + d) * tp + t`` sits at coordinates ``(p, d, t)``. Every process group
it creates carries an explicit timeout.

Faults. Every wait in the runtime goes through ``Mesh.wait``, which waits at
most the mesh's timeout. A rank whose computation raises calls
``Mesh.report_failure`` before re-raising: that writes one line (which rank,
which stage, which action, what error) into the default group's store, first
writer wins. A rank whose wait then fails -- the peer's process exited and its
connection closed, or the timeout ran out -- reads that line and raises
``RankFailedError`` naming the failed rank; with no line it raises ``CommError``
naming the peer it waited for. So a raising rank stops the others within one
timeout, and usually at once (its exit closes the connections). A rank that dies
without a word (killed, ``os._exit``) is named by the others from the wait that
failed: its rank, coordinates and stages, and whether its connection closed (it
died) or the timeout ran out (it stalled).
"""

from __future__ import annotations

import contextlib
import datetime
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tripar.errors import ConfigError, TriparError

__all__ = ["CommError", "Mesh", "MeshCoords", "RankFailedError", "build_mesh"]

AXES = ("pp", "dp", "tp")
_FAILURE_KEY = "tripar/failure"


class RankFailedError(TriparError, RuntimeError):
    """Another rank failed; the message names it, its stage and its error."""


class CommError(TriparError, RuntimeError):
    """A wait for another rank timed out or lost its connection, and no rank reported a failure."""


@dataclass(frozen=True, slots=True)
class MeshCoords:
    """This rank's coordinates on the mesh axes."""

    pp: int
    dp: int
    tp: int


class Mesh:
    """This rank's view of the (pp, dp, tp) mesh: sizes, coordinates, groups, peers, timeouts.

    Built by ``build_mesh``; the runtime's other pieces take it instead of process groups.
    """

    def __init__(self, device_mesh: DeviceMesh, *, timeout_s: float, backend: str,
                 vpp: int = 1, pipelines: int = 1,
                 grad_group: dist.ProcessGroup | None = None) -> None:
        self.device_mesh = device_mesh
        self.timeout_s = float(timeout_s)
        self.backend = backend
        self.vpp = int(vpp)
        """Virtual stages per pipeline rank (to name the stages a failed peer runs)."""
        self.pipelines = int(pipelines)
        """2 under chimera: pipeline rank r also holds stage pp - 1 - r."""
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.pp, self.dp, self.tp = (int(n) for n in device_mesh.mesh.shape)
        self.coords = MeshCoords(*(int(c) for c in device_mesh.get_coordinate()))
        self.pp_group = device_mesh.get_group("pp")
        self.dp_group = device_mesh.get_group("dp")
        self.tp_group = device_mesh.get_group("tp")
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if backend == "nccl" else torch.device("cpu"))
        self._pp_ranks = tuple(dist.get_process_group_ranks(self.pp_group))
        self._store = _default_store()
        self.grad_group = self.dp_group if grad_group is None else grad_group
        """The ranks whose gradients of this rank's weights are summed: its dp group, and
        under chimera also the dp group of the mirror rank pp - 1 - r (the other replica
        of the same two stages)."""
        self.grad_size = self.dp * self.pipelines
        """Members of ``grad_group``: the copies of each gradient summed (averaged over dp)."""
        self.grad_index = (self.coords.dp if grad_group is None
                           else dist.get_group_rank(grad_group, self.rank))
        """This rank's position in ``grad_group`` (which ZeRO shard it owns)."""
        self.mirror = self.pipelines == 2 and 2 * self.coords.pp >= self.pp
        """Under chimera, the second holder of its stages (pp - 1 - r < r): its gradient
        norm is its mirror's, counted there."""

    # ---- layout ----------------------------------------------------------------------------

    def group(self, axis: str) -> dist.ProcessGroup:
        """The process group of ``axis`` ("pp", "dp" or "tp") that holds this rank."""
        if axis not in AXES:
            raise ConfigError(f"unknown mesh axis {axis!r}; the axes are {', '.join(AXES)}")
        return getattr(self, f"{axis}_group")

    def size(self, axis: str) -> int:
        """The degree of ``axis``."""
        self.group(axis)
        return getattr(self, axis)

    def coord(self, axis: str) -> int:
        """This rank's coordinate on ``axis``."""
        self.group(axis)
        return getattr(self.coords, axis)

    def pp_rank_global(self, pp_coord: int) -> int:
        """The global rank at pipeline coordinate ``pp_coord`` (same dp and tp as this rank)."""
        return self._pp_ranks[pp_coord % self.pp]

    @property
    def prev_rank(self) -> int:
        """Global rank of the previous pipeline peer (wraps around: rank 0's is the last)."""
        return self.pp_rank_global(self.coords.pp - 1)

    @property
    def next_rank(self) -> int:
        """Global rank of the next pipeline peer (wraps around: the last rank's is rank 0)."""
        return self.pp_rank_global(self.coords.pp + 1)

    def stage_rank(self, stage: int) -> int:
        """Global rank that runs virtual stage ``stage`` of this rank's pipeline (s % pp)."""
        return self.pp_rank_global(stage % self.pp)

    def describe(self) -> str:
        """``rank 3 (pp 1, dp 1, tp 0)``."""
        c = self.coords
        return f"rank {self.rank} (pp {c.pp}, dp {c.dp}, tp {c.tp})"

    def coords_of(self, rank: int) -> MeshCoords:
        """The coordinates of global rank ``rank`` (tp innermost, as ``build_mesh`` lays out)."""
        return MeshCoords(rank // (self.dp * self.tp), rank // self.tp % self.dp, rank % self.tp)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The virtual stages global rank ``rank`` runs: p, p + pp, ... for its pp coordinate p
        (p and pp - 1 - p under chimera)."""
        p = self.coords_of(rank).pp
        if self.pipelines == 2:
            return tuple(sorted({p, self.pp - 1 - p}))
        return tuple(p + k * self.pp for k in range(self.vpp))

    def describe_rank(self, rank: int) -> str:
        """``rank 1 (pp 1, dp 0, tp 0), which runs stage 1``: any rank of the mesh."""
        c, stages = self.coords_of(rank), self.stages_of(rank)
        runs = (f"stage {stages[0]}" if len(stages) == 1
                else f"stages {', '.join(map(str, stages))}")
        return f"rank {rank} (pp {c.pp}, dp {c.dp}, tp {c.tp}), which runs {runs}"

    # ---- faults ----------------------------------------------------------------------------

    def report_failure(self, message: str) -> None:
        """Record that this rank failed (first report in the job wins); never raises."""
        if self._store is None:
            return
        try:
            self._store.compare_set(_FAILURE_KEY, "", message)
        except Exception:  # noqa: BLE001 - reporting must not mask the original error
            pass

    def failure(self) -> str | None:
        """The first failure any rank reported, or None."""
        if self._store is None:
            return None
        try:
            if not self._store.check([_FAILURE_KEY]):
                return None
            return self._store.get(_FAILURE_KEY).decode(errors="replace")
        except Exception:  # noqa: BLE001 - a dead store means no report can be read
            return None

    def wait(self, works: Iterable[Any], *, what: str, peers: Sequence[int] = ()) -> None:
        """Wait for every Work in ``works``, at most ``timeout_s`` each.

        ``what`` says what is awaited (``"stage 2's activations of microbatch 1"``),
        ``peers`` which global ranks it comes from. Raises ``RankFailedError`` when a
        rank has reported a failure, ``CommError`` otherwise.
        """
        timeout = datetime.timedelta(seconds=self.timeout_s)
        for work in works:
            try:
                work.wait(timeout)
            except Exception as exc:  # noqa: BLE001 - re-raised with who failed
                raise self.wait_error(what, peers, exc, self.timeout_s) from exc

    @contextlib.contextmanager
    def guard(self, what: str, peers: Sequence[int] | None = None) -> Iterator[None]:
        """Name who failed when a blocking collective in the block fails (``all_gather_object``,
        ``broadcast_object_list``: bounded by the default group's timeout, not ``wait``'s).
        ``peers``: the global ranks it involves (default: the world)."""
        try:
            yield
        except (RankFailedError, CommError):
            raise
        except RuntimeError as exc:  # the backend's error: a lost connection or a timeout
            ranks = range(self.world_size) if peers is None else peers
            raise self.wait_error(what, tuple(ranks), exc) from exc

    def wait_error(self, what: str, peers: Sequence[int], exc: BaseException,
                   waited_s: float | None = None) -> TriparError:
        """The error for a wait on ``peers`` that failed with the backend's ``exc``: a
        RankFailedError quoting a failure another rank reported, else a CommError naming
        the peer that died or stalled."""
        failure = self.failure()
        if failure is not None:
            return RankFailedError(
                f"{failure}. {self.describe()} stopped while waiting for {what}."
            )
        return CommError(self.lost_peer_message(what, peers, exc, waited_s))

    def lost_peer_message(self, what: str, peers: Sequence[int], exc: BaseException,
                          waited_s: float | None = None) -> str:
        """Why a wait for ``peers`` failed with no failure reported: they died or stalled.
        ``waited_s``: the timeout the wait had (None: the process group's)."""
        peers = tuple(peers) or tuple(range(self.world_size))  # none named: the whole world
        others = [p for p in peers if p != self.rank] or list(peers)
        if len(others) == 1:
            who, short = self.describe_rank(others[0]), f"rank {others[0]}"
        else:
            who = "one of " + "; ".join(self.describe_rank(p) for p in others)
            short = f"one of ranks {others}"
        cause = short_cause(exc)
        if _connection_lost(exc):
            return (f"{self.describe()} lost {who}, while waiting for {what}: its connection "
                    f"closed ({cause}), so {short} died or was killed without reporting an "
                    f"error. Check {short}'s log (out of memory, a signal, os._exit).")
        waited = (f"waited {waited_s:g} s (timeout_s)" if waited_s is not None
                  else "waited the process group's timeout")
        return (f"{self.describe()} {waited} for {what} from {who} and gave up ({cause}). "
                f"{short[0].upper()}{short[1:]} stalled, died or runs a different schedule; "
                f"check its log, or raise timeout_s if it is only slow.")


_LOST = ("connection reset", "connection closed", "broken pipe", "end of file", "eof",
         "connection refused", "socket closed")


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the backend's report of a lost peer or a timed-out collective
    (gloo and NCCL raise RuntimeErrors (DistBackendError) naming one or the other)."""
    if not isinstance(exc, RuntimeError) or isinstance(exc, TriparError):
        return False
    text = str(exc).lower()
    return _connection_lost(exc) or "timed out" in text or "timeout" in text or isinstance(
        exc, getattr(dist, "DistBackendError", ()))


def _connection_lost(exc: BaseException) -> bool:
    """Whether a failed wait means the peer's process is gone (not just late)."""
    text = str(exc).lower()
    return "timed out" not in text and "timeout" not in text and any(w in text for w in _LOST)


def short_cause(exc: BaseException) -> str:
    """The backend's error without its source path and boilerplate.

    >>> short_cause(RuntimeError("[/src/gloo/pair.cc:537] Read error: Connection reset by "
    ...                          "peer. This is typically caused by a remote worker hanging"))
    'RuntimeError: Read error: Connection reset by peer.'
    """
    text = " ".join(str(exc).split())
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    text = text.split(" This is typically caused")[0].strip()
    return f"{type(exc).__name__}: {text[:240]}"


def _default_store() -> dist.Store | None:
    get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
    if get_store is None:
        return None
    try:
        return get_store()
    except Exception:  # noqa: BLE001 - a group without a store still runs, without fault reports
        return None


def _options(backend: str, timeout: datetime.timedelta) -> Any:
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return opts
    return torch._C._distributed_c10d.Backend.Options(backend, timeout)


def build_mesh(pp: int, dp: int, tp: int, *, backend: str | None = None,
               timeout_s: float = 600.0, vpp: int = 1, pipelines: int = 1) -> Mesh:
    """Lay the initialised world out as a (pp, dp, tp) mesh, tp innermost.

    ``backend`` defaults to the default group's (gloo on CPU, nccl on CUDA); every
    group created gets ``timeout_s``; ``vpp`` (virtual stages per pipeline rank) only
    names stages in errors. ``pipelines=2`` (chimera) also builds, for each pair of
    pipeline ranks r and pp - 1 - r and each tp rank, the group of their 2 x dp ranks
    that sums the gradients of the two stages both hold (``Mesh.grad_group``). A
    collective: every rank calls it with the same arguments.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("build_mesh needs an initialised default process group; call "
                          "torch.distributed.init_process_group first (torchrun sets it up)")
    for axis, n in zip(AXES, (pp, dp, tp)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"mesh degree {axis} must be a positive integer, got {n!r}")
    world = dist.get_world_size()
    if pp * dp * tp != world:
        raise ConfigError(f"mesh pp={pp} x dp={dp} x tp={tp} = {pp * dp * tp} ranks, but the "
                          f"world has {world}; choose degrees whose product is {world}")
    if not isinstance(vpp, int) or isinstance(vpp, bool) or vpp < 1:
        raise ConfigError(f"vpp must be a positive integer, got {vpp!r}")
    if pipelines not in (1, 2) or (pipelines == 2 and pp % 2):
        raise ConfigError(f"pipelines={pipelines!r} with pp={pp}: a mesh runs one pipeline, or "
                          f"two in opposite directions (chimera) over an even pp")
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s must be positive, got {timeout_s!r}")
    if backend is None:
        backend = str(dist.get_backend())
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"backend {backend!r} is not supported; use 'gloo' (CPU) or 'nccl' (CUDA)")
    device_type = "cuda" if backend == "nccl" else "cpu"
    timeout = datetime.timedelta(seconds=timeout_s)
    key = (pp, dp, tp, backend, float(timeout_s))
    world, device_mesh = _MESHES.get(key, (None, None))
    if world is not dist.group.WORLD:  # none yet in this process group (or a destroyed one)
        device_mesh = init_device_mesh(
            device_type, (pp, dp, tp), mesh_dim_names=AXES,
            backend_override={axis: (backend, _options(backend, timeout)) for axis in AXES},
        )
        _MESHES[key] = (dist.group.WORLD, device_mesh)
    grad_group = _mirror_group(device_mesh, timeout, backend) if pipelines == 2 else None
    return Mesh(device_mesh, timeout_s=timeout_s, backend=backend, vpp=vpp,
                pipelines=pipelines, grad_group=grad_group)


def _mirror_group(device_mesh: DeviceMesh, timeout: datetime.timedelta,
                  backend: str) -> dist.ProcessGroup:
    """This rank's group of the dp ranks at pipeline ranks r and pp - 1 - r (same tp rank);
    every rank creates every such group, in the same order (``new_group`` is collective).
    Cached per mesh, as the mesh's own groups are."""
    key = (id(device_mesh), timeout, backend)
    if key in _MIRRORS and _MIRRORS[key][0] is dist.group.WORLD:
        return _MIRRORS[key][1]
    grid = device_mesh.mesh
    pp, dp, tp = (int(n) for n in grid.shape)
    mine = None
    for r in range(pp // 2):
        for t in range(tp):
            ranks = sorted(int(grid[p, d, t]) for p in (r, pp - 1 - r) for d in range(dp))
            group = dist.new_group(ranks, timeout=timeout, backend=backend)
            if dist.get_rank() in ranks:
                mine = group
    assert mine is not None, "every rank is in one mirror group"
    _MIRRORS[key] = (dist.group.WORLD, mine)
    return mine


_MIRRORS: dict[tuple, tuple[Any, dist.ProcessGroup]] = {}
"""The chimera gradient groups built in this process, as ``_MESHES`` keeps the meshes."""


_MESHES: dict[tuple, tuple[Any, DeviceMesh]] = {}
"""The device meshes built in this process, by (pp, dp, tp, backend, timeout), with the
default group they were built in: a later mesh of the same shape reuses their process
groups (every rank builds the same meshes in the same order, so all reuse alike) instead of
creating, and leaking, a new set on every ``auto_parallel`` call."""
