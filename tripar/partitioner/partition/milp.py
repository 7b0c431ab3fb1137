"""The stage partition and recompute problem as a MILP (pulp; HiGHS, else CBC).

Same problem and model as :mod:`tripar.partitioner.partition.problem` (read its module
docstring); the DP and this MILP must reach the same objective. The model is
built apart from solving it (:func:`build_partition_milp`) so that it can be
read or written out (:meth:`PartitionMilp.dump_lp`); it is solved through
:func:`tripar.partitioner.solvers.run_solver`. With ``n`` blocks and
``k`` stages:

Variables (binary unless noted)
    ``assign_b{b}_s{s}``     block b is on stage s (only where each stage can stay non-empty)
    ``recompute_b{b}_s{s}``  block b is on stage s and recomputed (recomputable blocks only)
    ``recompute_s{s}``       number of blocks stage s recomputes (integer)
    ``cut_b{b}_s{s}``        stage s ends after block b and stage s+1 starts there ([0, 1])
    ``workspace_s{s}``       bytes of the one block re-materialised at a time (>= 0)
    ``mem_s{s}``, ``time_s{s}``  stage memory and time per microbatch (s); memory rows are
                             in units of ``memory_unit`` bytes (a power of ten that keeps
                             the coefficients near 1e3, for the solver's tolerances)
    ``bottleneck``           the slowest stage's time

Constraints
    (a) ``one_stage_b{b}``: every block is on exactly one stage
    (b) ``order_b{b}_s{s}``: if block b+1 is on a stage <= s, so is block b (contiguity)
    (c) ``nonempty_s{s}``: every stage holds a block
    (d) ``recompute_on_b{b}_s{s}``: only a stage's own blocks are recomputed
        (``full_b{b}_s{s}`` makes it every one under ``recompute="full"``)
    (e) ``recompute_count_s{s}``: the per-stage count
    (f) ``cut_b{b}_s{s}``: the cut indicator (the objective pushes it down)
    (g) ``workspace_b{b}_s{s}``: workspace >= each recomputed block's saving
    (h) ``mem_def_s{s}``, ``mem_limit_s{s}``: stage memory and its budget
    (i) ``time_def_s{s}``, ``bottleneck_s{s}``: stage time, and the max over stages

Objective: ``(1/v) * sum_s time_s + (m*v - 1) * bottleneck``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pulp

from tripar.errors import InfeasibleError, PlanError
from tripar.partitioner.partition.diagnose import diagnose_infeasible
from tripar.partitioner.partition.problem import (
    PartitionProblem,
    PartitionSolution,
    evaluate_partition,
)
from tripar.partitioner.solvers import run_solver


@dataclass
class PartitionMilp:
    """The built MILP of one partition problem, with its variables by (block, stage)."""

    problem: PartitionProblem
    lp: pulp.LpProblem
    assign: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)
    recompute: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)
    time: dict[int, pulp.LpVariable] = field(default_factory=dict)
    memory: dict[int, pulp.LpVariable] = field(default_factory=dict)
    memory_unit: int = 1
    """Bytes per unit of the memory rows."""

    def dump_lp(self, path: str | Path) -> Path:
        """Write the model in LP format (readable; ``--dump-lp FILE``)."""
        path = Path(path)
        self.lp.writeLP(str(path))
        return path

    def solve(self, solver: str = "auto", *, time_limit_s: float | None = None,
              accept_not_optimal: bool = False) -> PartitionSolution:
        """Solve and read the partition back, costed by the common evaluator.

        An infeasible model raises InfeasibleError (the DP's diagnosis); a model
        stopped before optimality raises PlanError unless ``accept_not_optimal``,
        in which case the status says ``not-optimal``.
        """
        record = run_solver(self.lp, solver, time_limit_s=time_limit_s)
        if record.status == "infeasible":
            raise diagnose_infeasible(self.problem)
        if record.status == "not-optimal" and not accept_not_optimal:
            raise PlanError(
                f"the partition MILP stopped before proving optimality ({record.solver}, "
                f"{record.solve_time_s:.1f} s, objective {record.objective:.6g}); raise the "
                f"time limit or use the DP (solve_partition_dp)")
        if record.status not in ("optimal", "not-optimal"):
            raise PlanError(f"the partition MILP ended with status {record.status!r} "
                            f"({record.solver}); write it out with dump_lp to inspect it")
        p = self.problem
        stage_of = [-1] * p.num_blocks
        for (b, s), var in self.assign.items():
            if (var.value() or 0.0) > 0.5:
                stage_of[b] = s
        rec: list[list[int]] = [[] for _ in range(p.num_stages)]
        for (b, s), var in self.recompute.items():
            if (var.value() or 0.0) > 0.5:
                rec[s].append(b)
        bounds = [stage_of.index(s) for s in range(p.num_stages)]
        sol = evaluate_partition(p, bounds, rec, solver=record.solver, status=record.status,
                                 solve_time_s=record.solve_time_s, check_memory=False)
        for st in sol.stages:  # the solver's feasibility tolerance is ~1e-7 memory units
            if st.memory_bytes > st.memory_limit_bytes + self.memory_unit * 1e-6:
                raise PlanError(f"the partition MILP ({record.solver}) put {st.memory_bytes} "
                                f"bytes on stage {st.index}, over its budget of "
                                f"{st.memory_limit_bytes}; numerical trouble, use the DP")
        return sol


def build_partition_milp(problem: PartitionProblem) -> PartitionMilp:
    """Build (not solve) the MILP of ``problem``.

    >>> prob = PartitionProblem.uniform(4, stages=2, memory_limit_bytes=10,
    ...                                 num_microbatches=2)
    >>> milp = build_partition_milp(prob)
    >>> sorted(milp.lp.constraints)[:3]
    ['bottleneck_s0', 'bottleneck_s1', 'cut_b0_s0']
    >>> milp.assign[2, 1].name
    'assign_b2_s1'
    """
    p = problem
    n, k = p.num_blocks, p.num_stages
    if n < k:
        raise InfeasibleError(f"cannot cut {n} blocks into {k} non-empty pipeline stages; "
                              f"use at most {n} stages")
    lp = pulp.LpProblem("stage_partition", pulp.LpMinimize)
    unit = 10 ** max(0, int(math.log10(max(p.memory_limit_bytes) or 1)) - 3)
    milp = PartitionMilp(p, lp, memory_unit=unit)
    stages_of = {b: range(max(0, b - (n - k)), min(b, k - 1) + 1) for b in range(n)}
    for b in range(n):
        for s in stages_of[b]:
            milp.assign[b, s] = pulp.LpVariable(f"assign_b{b}_s{s}", cat="Binary")
            if p.recomputable(b):
                milp.recompute[b, s] = pulp.LpVariable(f"recompute_b{b}_s{s}", cat="Binary")

    def a(b: int, s: int):
        return milp.assign.get((b, s), 0)

    bottleneck = pulp.LpVariable("bottleneck", lowBound=0)
    for s in range(k):
        milp.time[s] = pulp.LpVariable(f"time_s{s}", lowBound=0)
        milp.memory[s] = pulp.LpVariable(f"mem_s{s}", lowBound=0)
    v = p.virtual_stages
    lp += (pulp.lpSum(milp.time.values()) * (1.0 / v)
           + (p.num_microbatches * v - 1) * bottleneck), "step_time"

    for b in range(n):                                                         # (a)
        lp += pulp.lpSum(milp.assign[b, s] for s in stages_of[b]) == 1, f"one_stage_b{b}"
    for b in range(n - 1):                                                     # (b)
        for s in range(k - 1):
            lp += (pulp.lpSum(a(b + 1, t) for t in range(s + 1))
                   <= pulp.lpSum(a(b, t) for t in range(s + 1))), f"order_b{b}_s{s}"
    for s in range(k):                                                         # (c)
        lp += pulp.lpSum(a(b, s) for b in range(n)) >= 1, f"nonempty_s{s}"
    for (b, s), var in milp.recompute.items():                                 # (d)
        if p.recompute == "full":
            lp += var == milp.assign[b, s], f"full_b{b}_s{s}"
        else:
            lp += var <= milp.assign[b, s], f"recompute_on_b{b}_s{s}"
    cuts: dict[int, list] = {s: [] for s in range(k)}
    for s in range(k):
        count = pulp.LpVariable(f"recompute_s{s}", lowBound=0, cat="Integer")  # (e)
        lp += count == pulp.lpSum(milp.recompute.get((b, s), 0) for b in range(n)), \
            f"recompute_count_s{s}"
        if s + 1 < k:                                                          # (f)
            for b in range(n - 1):
                if (b, s) in milp.assign and (b + 1, s + 1) in milp.assign:
                    cut = pulp.LpVariable(f"cut_b{b}_s{s}", lowBound=0, upBound=1)
                    lp += cut >= milp.assign[b, s] + milp.assign[b + 1, s + 1] - 1, \
                        f"cut_b{b}_s{s}"
                    cuts[s].append((b, cut))
        workspace = pulp.LpVariable(f"workspace_s{s}", lowBound=0)
        for b in range(n):                                                     # (g)
            if (b, s) in milp.recompute:
                lp += workspace >= p.saving_bytes(b) / unit * milp.recompute[b, s], \
                    f"workspace_b{b}_s{s}"
        c = p.in_flight[s]
        lp += milp.memory[s] == (                                              # (h)
            pulp.lpSum((p.static_bytes[b] + c * p.activation_bytes[b]) / unit * a(b, s)
                       for b in range(n))
            - pulp.lpSum(c * p.saving_bytes(b) / unit * milp.recompute[b, s]
                         for b in range(n) if (b, s) in milp.recompute)
            + workspace), f"mem_def_s{s}"
        lp += milp.memory[s] <= p.memory_limit_bytes[s] / unit, f"mem_limit_s{s}"
        lp += milp.time[s] == (                                                # (i)
            pulp.lpSum((p.forward_s[b] + p.backward_s[b]) * a(b, s) for b in range(n))
            + pulp.lpSum(p.recompute_s[b] * milp.recompute[b, s]
                         for b in range(n) if (b, s) in milp.recompute)
            + pulp.lpSum(p.cut_s[b] * cut for b, cut in cuts[s])), f"time_def_s{s}"
        lp += bottleneck >= milp.time[s], f"bottleneck_s{s}"
    return milp


def solve_partition_milp(problem: PartitionProblem, *, solver: str = "auto",
                         time_limit_s: float | None = None,
                         dump_lp: str | Path | None = None) -> PartitionSolution:
    """Build, optionally write out, and solve the MILP of ``problem``.

    >>> prob = PartitionProblem.uniform(6, stages=3, activation_bytes=10, input_bytes=1,
    ...                                 memory_limit_bytes=40, num_microbatches=4)
    >>> sol = solve_partition_milp(prob)
    >>> sol.status, sol.boundaries, round(sol.objective_s, 6)
    ('optimal', (0, 2, 4), 44.0)
    """
    milp = build_partition_milp(problem)
    if dump_lp is not None:
        milp.dump_lp(dump_lp)
    return milp.solve(solver, time_limit_s=time_limit_s)
