"""The exact stage partition: a chain DP over ranges under each candidate bottleneck.

Solves :class:`~tripar.partitioner.partition.problem.PartitionProblem` exactly (see
:func:`solve_partition_dp`); a chain with a long run of identical blocks goes to the
count solver of :mod:`tripar.partitioner.partition.runs`, which reaches the same optimum.
"""

from __future__ import annotations

import math
import time

import numpy as np

from tripar.errors import InfeasibleError
from tripar.partitioner.partition.diagnose import diagnose_infeasible
from tripar.partitioner.partition.problem import (
    PartitionProblem,
    PartitionSolution,
    evaluate_partition,
)
from tripar.partitioner.partition.runs import find_run, solve_partition_runs
from tripar.partitioner.partition.stage_table import StageTable, trace

_INF = math.inf


def _chain_dp(tables: list[np.ndarray], cap: float) -> tuple[float, list[np.ndarray]]:
    """min sum of stage times with every stage time <= cap; returns (sum, argmin per stage)."""
    n1 = tables[0].shape[0]
    best = np.full(n1, _INF)
    best[0] = 0.0
    args = []
    for table in tables:
        masked = np.where(table <= cap, table, _INF)
        total = best[:, None] + masked
        arg = np.argmin(total, axis=0)
        best = total[arg, np.arange(n1)]
        args.append(arg)
    return float(best[-1]), args



def solve_partition_dp(problem: PartitionProblem, *, use_runs: bool = True) -> PartitionSolution:
    """Exact minimum of the step-time model over contiguous partitions and recompute sets.

    For each candidate bottleneck value ``B`` (a stage time that some stage can
    have), a chain DP finds the least sum of stage times with every stage at
    most ``B``; the optimum is ``min_B sum_B / v + (m*v - 1) * B``. Candidates
    are tried in increasing order from the smallest feasible one and the loop
    stops once ``(m*v - 1) * B`` plus the unconstrained least sum cannot win.
    Cost: ``O(n^2 k)`` per candidate (numpy), plus one recompute choice per
    distinct range composition and stage, so a chain of identical layers
    costs about as much as its length, not the square of the number of types.
    With ``use_runs`` (default), a chain with a long run of identical blocks is solved
    by layer counts instead (:mod:`tripar.partitioner.partition.runs`, same optimum,
    work linear in the run's length); ``use_runs=False`` forces the DP over ranges.

    >>> prob = PartitionProblem.uniform(6, stages=3, activation_bytes=10, input_bytes=1,
    ...                                 memory_limit_bytes=40, num_microbatches=4)
    >>> sol = solve_partition_dp(prob)
    >>> sol.boundaries, [s.recompute for s in sol.stages], sol.objective_s
    ((0, 2, 4), [(0, 1), (), ()], 44.0)
    """
    start = time.perf_counter()
    n, k = problem.num_blocks, problem.num_stages
    if n < k:
        raise InfeasibleError(
            f"cannot cut {n} blocks into {k} non-empty pipeline stages; use at most {n} "
            f"stages (pp * vpp <= {n})")
    if use_runs:
        run = find_run(problem)
        fast = solve_partition_runs(problem, run) if run is not None else None
        if fast is not None:
            return fast
    table = StageTable(problem)
    cells = [k * (n + 1) ** 2]
    steady = problem.num_microbatches * problem.virtual_stages - 1
    v = problem.virtual_stages
    free_sum, free_args = _chain_dp(table.tables, _INF)
    cells[0] += k * (n + 1) ** 2
    if not math.isfinite(free_sum):
        raise diagnose_infeasible(problem)
    if steady == 0:
        best_args = free_args
    else:
        values = np.unique(np.concatenate([t[np.isfinite(t)] for t in table.tables]))
        lo, hi = 0, len(values) - 1      # smallest feasible cap, by bisection
        while lo < hi:
            mid = (lo + hi) // 2
            cells[0] += k * (n + 1) ** 2
            if math.isfinite(_chain_dp(table.tables, values[mid])[0]):
                hi = mid
            else:
                lo = mid + 1
        best_value, best_args = _INF, free_args
        for cap in values[lo:]:
            if free_sum / v + steady * cap >= best_value:
                break
            total, args = _chain_dp(table.tables, cap)
            cells[0] += k * (n + 1) ** 2
            if total / v + steady * cap < best_value:
                best_value, best_args = total / v + steady * cap, args
    bounds = trace(best_args, n)
    rec = [table.recompute_blocks(s, bounds[s], bounds[s + 1] if s + 1 < k else n)
           for s in range(k)]
    sol = evaluate_partition(problem, bounds, rec, solver="dp", status="optimal",
                             solve_time_s=time.perf_counter() - start)
    return PartitionSolution(sol.stages, sol.objective_s, sol.bottleneck_s, sol.solver,
                             sol.status, sol.solve_time_s, work=cells[0])
