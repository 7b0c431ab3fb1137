"""Which proven tensor-parallel regions to shard at degree t: a small ILP (pulp).

Sharding a region at degree ``t`` divides its compute and its weights (and the
activations inside it) by ``t`` but adds the Megatron collectives at its
edges. With binary ``shard_*`` per decision the problem is

    minimise    sum_g shard_g * (collective_s_g - compute_saving_s_g)      (time_delta)
    subject to  memory_bytes - sum_g shard_g * memory_saving_bytes_g <= memory_limit_bytes
                                                                       (memory_limit)

Only regions whose proven ``degrees`` include ``t`` are candidates; the others
stay replicated, with the reason recorded. Candidates that share a non-empty
``group`` (the same region of identical repeated layers) share one decision,
so a 96-layer model has a handful of variables, not hundreds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pulp

from tripar.errors import ConfigError, InfeasibleError, PlanError
from tripar.graph.proxy import TPRegion
from tripar.partitioner.solvers import run_solver


@dataclass(frozen=True, slots=True)
class TPCandidate:
    """A proven region with what sharding it at the degree in question gains and costs.

    All quantities are per training step on one device.
    """

    region: TPRegion
    compute_saving_s: float
    """Compute time saved by splitting the region's work t ways."""
    collective_s: float
    """Time of the collectives sharding adds (forward and backward), not overlapped."""
    memory_saving_bytes: int
    """Bytes of weights, gradients, optimizer state and activations saved per device."""
    group: str = ""
    """Candidates with the same non-empty group are sharded together or not at all."""

    def __post_init__(self) -> None:
        for name in ("compute_saving_s", "collective_s", "memory_saving_bytes"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"TPCandidate.{name} of {region_name(self.region)} must be "
                                  f">= 0, got {value}")

    @property
    def name(self) -> str:
        return region_name(self.region)


def region_name(region: TPRegion) -> str:
    """``block:kind:index`` (``TPRegion.name``), the name a region goes by in plans and ILPs.

    >>> region_name(TPRegion("mlp", "h.0", (), (), "all_reduce", "all_reduce", 8, (2,)))
    'h.0:mlp:0'
    """
    return region.name


@dataclass(frozen=True, slots=True)
class TPChoice:
    """The regions sharded at ``degree``, the ones left replicated and why, and provenance."""

    degree: int
    sharded: tuple[TPRegion, ...]
    replicated: tuple[tuple[TPRegion, str], ...]
    """(region, reason it stays replicated)."""
    time_delta_s: float
    """Step time change from sharding (negative: faster)."""
    memory_bytes: int
    """Device memory after sharding."""
    solver: str
    status: str
    objective: float
    solve_time_s: float


@dataclass
class TPMilp:
    """The built ILP: one binary per decision group."""

    lp: pulp.LpProblem
    degree: int
    groups: dict[str, list[TPCandidate]]
    variables: dict[str, pulp.LpVariable]
    memory_bytes: int
    unsupported: list[tuple[TPRegion, str]] = field(default_factory=list)

    def dump_lp(self, path: str | Path) -> Path:
        """Write the ILP in LP format."""
        path = Path(path)
        self.lp.writeLP(str(path))
        return path


def _var_name(index: int, key: str) -> str:
    return f"shard_g{index}_" + re.sub(r"[^A-Za-z0-9_]", "_", key)[:60]


def build_tp_problem(candidates: Sequence[TPCandidate], *, degree: int, memory_bytes: int,
                     memory_limit_bytes: int) -> TPMilp:
    """Build (not solve) the ILP for ``degree``; ``memory_bytes`` is the device's
    memory with nothing sharded.

    >>> r = TPRegion("mlp", "h.0", (), (), "all_reduce", "all_reduce", 8, (2, 4))
    >>> milp = build_tp_problem([TPCandidate(r, 2.0, 1.0, 100)], degree=2,
    ...                         memory_bytes=500, memory_limit_bytes=450)
    >>> sorted(milp.variables), list(milp.lp.constraints)
    (['h.0:mlp:0'], ['memory_limit'])
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ConfigError(f"tensor-parallel degree must be a positive integer, got {degree!r}")
    lp = pulp.LpProblem(f"tp_choice_t{degree}", pulp.LpMinimize)
    groups: dict[str, list[TPCandidate]] = {}
    unsupported = []
    for cand in candidates:
        if degree not in cand.region.degrees:
            proven = ", ".join(map(str, cand.region.degrees)) or "none"
            unsupported.append((cand.region, f"sharded shapes not proven at tp={degree} "
                                             f"(proven degrees: {proven})"))
            continue
        groups.setdefault(cand.group or cand.name, []).append(cand)
    variables = {key: pulp.LpVariable(_var_name(i, key), cat="Binary")
                 for i, key in enumerate(groups)}

    def delta(key: str) -> float:
        return sum(c.collective_s - c.compute_saving_s for c in groups[key])

    lp += pulp.lpSum(delta(key) * var for key, var in variables.items()), "time_delta"
    unit = 10 ** max(0, len(str(max(memory_limit_bytes, 1))) - 4)
    lp += (memory_bytes / unit - pulp.lpSum(sum(c.memory_saving_bytes for c in groups[key])
                                            / unit * var for key, var in variables.items())
           <= memory_limit_bytes / unit), "memory_limit"
    return TPMilp(lp, degree, groups, variables, memory_bytes, unsupported)


def choose_tp_regions(candidates: Sequence[TPCandidate], *, degree: int, memory_bytes: int,
                      memory_limit_bytes: int, solver: str = "auto",
                      dump_lp: str | Path | None = None) -> TPChoice:
    """Pick the regions to shard at ``degree``: least step time within the memory limit.

    With ``solver="auto"``, when sharding exactly the groups that save time fits in
    memory, that is the optimum and no solver runs (``solver`` of the result:
    ``closed-form``); otherwise the ILP is solved (HiGHS or CBC through pulp).

    >>> mlp = TPRegion("mlp", "h.0", (), (), "all_reduce", "all_reduce", 8, (2, 4))
    >>> att = TPRegion("attention", "h.0", (), (), "all_reduce", "all_reduce", 8, (4,))
    >>> cands = [TPCandidate(mlp, 1.0, 3.0, 300), TPCandidate(att, 1.0, 0.5, 200)]
    >>> choice = choose_tp_regions(cands, degree=4, memory_bytes=1000, memory_limit_bytes=600)
    >>> [region_name(r) for r in choice.sharded], choice.time_delta_s, choice.memory_bytes
    (['h.0:mlp:0', 'h.0:attention:0'], 1.5, 500)
    """
    if degree == 1:
        return TPChoice(1, (), tuple((c.region, "tp=1: nothing is sharded") for c in candidates),
                        0.0, memory_bytes, "none", "optimal", 0.0, 0.0)
    start = time.perf_counter()
    milp = build_tp_problem(candidates, degree=degree, memory_bytes=memory_bytes,
                            memory_limit_bytes=memory_limit_bytes)
    best_memory = memory_bytes - sum(c.memory_saving_bytes for g in milp.groups.values()
                                     for c in g)
    if best_memory > memory_limit_bytes:
        raise InfeasibleError(
            f"at tp={degree} a device needs {best_memory} bytes ({best_memory / 1e9:.2f} GB) "
            f"even with all {sum(map(len, milp.groups.values()))} proven regions sharded, but "
            f"has {memory_limit_bytes} bytes ({memory_limit_bytes / 1e9:.2f} GB); try a larger "
            f"tensor-parallel degree, more pipeline stages, ZeRO-1 or recomputation")
    if dump_lp is not None:
        milp.dump_lp(dump_lp)
    free = {key for key, group in milp.groups.items()
            if sum(c.collective_s - c.compute_saving_s for c in group) < 0}
    free_memory = memory_bytes - sum(c.memory_saving_bytes for key in free
                                     for c in milp.groups[key])
    if solver == "auto" and free_memory <= memory_limit_bytes:
        # The unconstrained optimum (shard exactly the groups that save time) fits, so it is
        # the ILP's optimum too: no solver run is needed.
        return _choice(milp, free, "closed-form", 0.0, start)
    record = run_solver(milp.lp, solver)
    if record.status != "optimal":
        raise PlanError(f"the tensor-parallel ILP ended with status {record.status!r} "
                        f"({record.solver}); write it out with dump_lp to inspect it")
    picked = {key for key in milp.groups if (milp.variables[key].value() or 0.0) > 0.5}
    return _choice(milp, picked, record.solver, record.objective, start)


def _choice(milp: TPMilp, picked: set[str], solver: str, objective: float,
            start: float) -> TPChoice:
    sharded, replicated = [], list(milp.unsupported)
    delta, memory = 0.0, milp.memory_bytes
    for key, group in milp.groups.items():
        if key in picked:
            for cand in group:
                sharded.append(cand.region)
                delta += cand.collective_s - cand.compute_saving_s
                memory -= cand.memory_saving_bytes
        else:
            for cand in group:
                replicated.append((cand.region, "its collectives cost more time than sharding "
                                                "saves, and memory fits without it"))
    objective = delta if solver == "closed-form" else objective
    return TPChoice(milp.degree, tuple(sharded), tuple(replicated), delta, memory, solver,
                    "optimal", objective, time.perf_counter() - start)
